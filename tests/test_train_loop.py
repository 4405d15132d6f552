# SPDX-License-Identifier: Apache-2.0
"""`dflash-train` on the tiny checkpoints (CPU): regenerated data, a short run that lowers the loss, a resume
that continues exactly (also with token-capped batches), batched target features equal to per-sequence ones,
and a written drafter that the checkpoint loader and the reference decoder accept."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from dflash_sglang.core.checkpoint import load_drafter
from dflash_sglang.core.config import DFlashDraftConfig
from dflash_sglang.training.cli import main
from dflash_sglang.training.data import load_sequences
from dflash_sglang.training.loop import (TrainConfig, Trainer, copy_target_layers, drafter_config_for,
                                         evaluate_acceptance, list_checkpoints, new_drafter, pack_batches,
                                         target_features)
from dflash_sglang.training.objective import batch_loss, build_batch, sample_anchors

pytestmark = pytest.mark.usefixtures("single_thread")

ARGS = ["--max-new-tokens", "40", "--gen-batch-size", "8", "--num-draft-layers", "2", "--block-size", "8",
        "--target-layer-ids", "1", "2", "--num-anchors", "16", "--batch-size", "2", "--eval-holdout", "2",
        "--eval-max-new-tokens", "24", "--no-progress"]


@pytest.fixture(scope="module")
def run(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"The cat walks to the market {i} times."})
                                 for i in range(12)))
    out = root / "run"
    assert main(["--target", tiny_checkpoints["target"], "--out", str(out), "--prompts", str(prompts),
                 "--epochs", "4", "--save-every", "5", *ARGS]) == 0
    return {"out": str(out), "target": tiny_checkpoints["target"]}


def _target(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def _fixed_loss(drafter, target, sequences):
    """The weighted loss of every sequence at all its anchors (no sampling)."""
    embedding, lm_head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for seq in sequences:
            anchors = sample_anchors(len(seq.tokens), seq.prompt_len, 10_000, torch.Generator().manual_seed(0))
            batch = build_batch([seq.tokens], [anchors], drafter.config.block_size, drafter.config.mask_token_id, 7.0)
            features = target_features(target, batch.tokens, batch.attention_mask, drafter.config.target_layer_ids)
            parts = batch_loss(drafter, embedding, lm_head, batch.blocks, features)
            total, weight = total + float(parts.weighted_ce), weight + float(parts.weight)
    return total / weight


def test_cli_writes_data_checkpoints_and_a_loadable_drafter(run):
    out = run["out"]
    rows = [json.loads(line) for line in open(os.path.join(out, "data.jsonl"))]
    assert len(rows) == 12 and all(len(r["response_ids"]) >= 2 for r in rows)
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["step-0000015", "step-0000020"]
    config = DFlashDraftConfig.from_pretrained(out)
    assert (config.block_size, config.target_layer_ids, config.num_hidden_layers) == (8, (1, 2), 2)
    target = _target(run["target"])
    config.check_target(target.config)
    load_drafter(out)
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("fc.weight").dtype == torch.bfloat16
    evals = json.load(open(os.path.join(out, "eval.json")))
    assert evals[-1]["step"] == 20 and evals[-1]["acceptance_length"] >= 1.0


def test_training_lowers_the_loss_and_raises_acceptance(run):
    target = _target(run["target"])
    rows = load_sequences(os.path.join(run["out"], "data.jsonl"))
    sequences = [s for _, s in rows]
    trained = load_drafter(run["out"]).float()
    untrained = new_drafter(trained.config, seed=0)
    before, after = _fixed_loss(untrained, target, sequences), _fixed_loss(trained, target, sequences)
    assert after < 0.5 * before, (before, after)
    held_out = [row["prompt_ids"] for row, _ in rows[-2:]]
    accepted = [evaluate_acceptance(target, d, held_out, max_new_tokens=24)["acceptance_length"]
                for d in (untrained, trained)]
    assert accepted[1] > accepted[0] + 1.0, accepted


def test_batched_target_features_equal_per_sequence_ones(run):
    target = _target(run["target"])
    rows = load_sequences(os.path.join(run["out"], "data.jsonl"))[:3]
    sequences = [s.tokens[:n] for (_, s), n in zip(rows, (60, 37, 51))]  # different lengths: padding
    batch = build_batch(sequences, [torch.zeros(0, dtype=torch.int64)] * 3, 8, 0, 7.0)
    features = target_features(target, batch.tokens, batch.attention_mask, (1, 2))
    for row, tokens in enumerate(sequences):
        alone = target_features(target, tokens[None], torch.ones_like(tokens)[None], (1, 2))[0]
        torch.testing.assert_close(features[row, :len(tokens)], alone, rtol=1e-4, atol=1e-5)
        assert not features[row, len(tokens):].any()


def test_batches_respect_the_sequence_and_token_caps():
    lengths = [5, 9, 3, 20, 4, 4]
    assert pack_batches(range(6), lengths, 4, None) == [[0, 1, 2, 3], [4, 5]]
    # padded tokens = count x longest <= 20; the 20-token sequence is a batch alone
    assert pack_batches(range(6), lengths, 4, 20) == [[0, 1], [2], [3], [4, 5]]
    assert pack_batches([3, 0], lengths, 4, 10) == [[3], [0]]


@pytest.mark.parametrize("max_batch_tokens", [None, 120])
def test_resume_continues_exactly(run, tmp_path, max_batch_tokens):
    target = _target(run["target"])
    sequences = [s for _, s in load_sequences(os.path.join(run["out"], "data.jsonl"))][:6]
    config = load_drafter(run["out"]).config
    train = TrainConfig(num_draft_layers=2, block_size=8, num_anchors=8, batch_size=3, max_steps=6, save_every=2,
                        max_batch_tokens=max_batch_tokens)

    def trainer(out, resume=False):
        return Trainer(target, new_drafter(config, seed=1), sequences, train, str(out), device=torch.device("cpu"),
                       resume=resume, progress=False)

    straight = trainer(tmp_path / "a")
    straight.run()
    first = trainer(tmp_path / "b")
    first.run(until=3)
    resumed = trainer(tmp_path / "b", resume=True)
    assert resumed.step == 3
    resumed.run()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for (name, a), (_, b) in zip(straight.drafter.named_parameters(), resumed.drafter.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_trained_drafter_serves_losslessly_in_sglang(run, tmp_path):
    """The written drafter loads in an SGLang DFLASH server (CPU) and its greedy output is the target's own."""
    from transformers import AutoTokenizer

    from dflash_sglang.core.reference import target_generate
    from dflash_sglang.deploy.launch import ServerProcess

    prompt = "The cat walks to the market"
    args = ["--model-path", run["target"], "--device", "cpu", "--attention-backend", "torch_native",
            "--disable-cuda-graph", "--skip-server-warmup", "--mem-fraction-static", "0.1", "--max-total-tokens",
            "4096", "--dtype", "float32", "--context-length", "512", "--speculative-algorithm", "DFLASH",
            "--speculative-draft-model-path", run["out"]]
    with ServerProcess(args, log_path=str(tmp_path / "dflash.log"), env=dict(os.environ)) as server:
        ids, meta = server.generate_greedy(prompt, 24)
    prompt_ids = AutoTokenizer.from_pretrained(run["target"])(prompt)["input_ids"]
    expected = target_generate(_target(run["target"]), [prompt_ids], max_new_tokens=24)[0]
    assert ids == expected
    assert meta["spec_verify_ct"] >= 1


def test_time_limit_checkpoints_and_stops(run, tmp_path):
    import time

    target = _target(run["target"])
    sequences = [s for _, s in load_sequences(os.path.join(run["out"], "data.jsonl"))][:4]
    train = TrainConfig(num_draft_layers=2, block_size=8, num_anchors=4, batch_size=2, max_steps=10, save_every=100)
    trainer = Trainer(target, new_drafter(load_drafter(run["out"]).config, seed=1), sequences, train, str(tmp_path),
                      device=torch.device("cpu"), progress=False)
    trainer.run(deadline=time.monotonic() - 1)
    assert trainer.step == 1
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-0000001"]


def test_schedule_fitted_to_the_time_limit_ends_at_a_low_learning_rate(run, tmp_path):
    """``--fit-schedule``: a clock that ticks one second per reading makes each step cost ~1 s; with 80 s to the
    deadline the 500-step schedule shrinks to what fits, the run finishes it before the deadline with the last
    learning rate near zero, and a resumed run keeps the fitted length."""
    from itertools import count

    from dflash_sglang.training.loop import FIT_AFTER_STEPS, FIT_SKIP_STEPS

    target = _target(run["target"])
    sequences = [s for _, s in load_sequences(os.path.join(run["out"], "data.jsonl"))][:4]
    train = TrainConfig(num_draft_layers=2, block_size=8, num_anchors=4, batch_size=2, max_steps=500, save_every=40)
    config = load_drafter(run["out"]).config

    def trainer(resume=False):
        return Trainer(target, new_drafter(config, seed=1), sequences, train, str(tmp_path),
                       device=torch.device("cpu"), resume=resume, progress=False)

    ticks = count()
    fitted = trainer()
    fitted.run(until=60, deadline=80.0, fit_schedule_to_deadline=True, clock=lambda: float(next(ticks)))
    fit_step = FIT_SKIP_STEPS + FIT_AFTER_STEPS
    assert fitted.schedule_fitted and fit_step < fitted.total_steps < 80
    assert fitted.step == 60
    resumed = trainer(resume=True)
    assert resumed.schedule_fitted and resumed.total_steps == fitted.total_steps and resumed.step == 60
    resumed.run()
    assert resumed.step == resumed.total_steps
    lrs = [record["lr"] for record in resumed.history]
    assert max(lrs) == pytest.approx(train.lr, rel=0.05)
    assert lrs[-1] == 0.0 and all(a >= b for a, b in zip(lrs[fit_step:], lrs[fit_step + 1:]))
    with pytest.raises(SystemExit, match="pass both"):
        main(["--target", run["target"], "--out", str(tmp_path / "cli"), "--data",
              os.path.join(run["out"], "data.jsonl"), "--fit-schedule", *ARGS])


def _tiny_llama(attention_bias: bool):
    """A real transformers Llama (no q/k norms) shaped like the tiny drafter's layers, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=attention_bias)
    return LlamaForCausalLM(config).eval()


def test_drafter_layers_start_from_the_targets_last_layers(run):
    """``--init-layers-from-target``: drafter layer i holds the target's layer L - n + i (Qwen3: q/k norms too;
    Llama: q/k norms stay one) and the target's final norm; targets whose layers hold more (biases) are refused."""
    for target in (_target(run["target"]), _tiny_llama(attention_bias=False)):
        drafter = new_drafter(drafter_config_for(target.config, TrainConfig(num_draft_layers=2), 0), seed=0)
        copied = copy_target_layers(drafter, target)
        layers = target.get_decoder().layers
        assert copied == [len(layers) - 2, len(layers) - 1]
        for layer, index in zip(drafter.layers, copied):
            source = dict(layers[index].named_parameters())
            for name, param in layer.named_parameters():
                if name in source:
                    assert torch.equal(param, source[name]), name
                else:
                    assert name.endswith(("q_norm.weight", "k_norm.weight")), name
                    assert torch.equal(param, torch.ones_like(param)), name
        assert torch.equal(drafter.norm.weight, target.get_decoder().norm.weight)
    biased = _tiny_llama(attention_bias=True)
    drafter = new_drafter(drafter_config_for(biased.config, TrainConfig(num_draft_layers=2), 0), seed=0)
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.bias"):
        copy_target_layers(drafter, biased)
    from transformers import GemmaConfig, GemmaForCausalLM  # Llama's parameter names, RMSNorm of 1 + weight

    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    drafter = new_drafter(drafter_config_for(gemma.config, TrainConfig(num_draft_layers=2), 0), seed=0)
    with pytest.raises(ValueError, match="a gemma decoder layer does not map"):
        copy_target_layers(drafter, gemma)


def test_cli_refuses_two_starting_points(run, tmp_path):
    with pytest.raises(SystemExit, match="pass one"):
        main(["--target", run["target"], "--out", str(tmp_path), "--data", os.path.join(run["out"], "data.jsonl"),
              "--init-from", run["out"], "--init-layers-from-target", *ARGS])
