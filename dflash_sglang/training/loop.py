# SPDX-License-Identifier: Apache-2.0
"""The training loop: a new drafter shaped after its target, AdamW with warmup + cosine decay, checkpoints that
resume bit-for-bit, and the acceptance length measured with the project's reference decoder.

One optimizer step is one batch: the anchors and blocks are built on the host and copied to the device at
once, then one target forward over the right-padded sequences, one drafter forward + backward over all their
blocks (``objective.batch_loss``), the clipped AdamW update, and a single host read of the logged numbers.

Batches: consecutive sequences of the epoch's order, at most ``batch_size`` of them and, with
``max_batch_tokens``, at most that many padded tokens (count x longest; a longer sequence is a batch alone).
With a time budget (``run(..., fit_schedule_to_deadline=True)``), the schedule's length is set once from the
measured step rate (:data:`FIT_AFTER_STEPS` steps after :data:`FIT_SKIP_STEPS` start-up ones), so warmup and
cosine decay end at the deadline instead of being cut off at a high learning rate.
Determinism: the order of sequences in epoch ``e`` comes from a generator seeded with ``(seed, e)`` and the
anchors of step ``t`` from one seeded with ``(seed, t)``, so a run resumed from a checkpoint (weights, AdamW
moments, scheduler, step) takes exactly the steps the uninterrupted run would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from dflash_sglang.core.checkpoint import load_drafter, save_drafter
from dflash_sglang.core.config import DFlashDraftConfig, default_target_layer_ids
from dflash_sglang.core.model import DFlashDrafter
from dflash_sglang.training.data import TrainingSequence
from dflash_sglang.training.objective import Batch, batch_loss, build_batch, layer_forward, sample_anchors

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
FIT_SKIP_STEPS = 5  # start-up steps (allocator growth, autotuning) left out of the step rate
FIT_AFTER_STEPS = 20  # steps timed to fit the schedule to a deadline
FIT_HEADROOM = 0.97  # share of the time left that the fitted schedule plans to use


@dataclass
class TrainConfig:
    """Hyper-parameters (defaults: SpecForge's DFlash recipe, ``scripts/train_dflash.py``)."""

    num_draft_layers: int = 5
    block_size: int = 16
    target_layer_ids: tuple[int, ...] | None = None  # None: spread over [1, L - 3] like z-lab's drafters
    mask_token_id: int | None = None  # None: the tokenizer's mask token, else an unused vocabulary row
    num_anchors: int = 512
    gamma: float = 7.0
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    epochs: float = 6.0
    max_steps: int | None = None
    batch_size: int = 4  # sequences per optimizer step
    max_batch_tokens: int | None = None  # cap on a step's padded tokens (sequences x longest); None: no cap
    compile: bool = False  # torch.compile the drafter's layer forward (dynamic shapes)
    grad_clip: float = 1.0
    max_seq_len: int = 2048
    save_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    extra: dict = field(default_factory=dict)


def pick_mask_token_id(tokenizer, vocab_size: int) -> int:
    """The tokenizer's mask token, else the first embedding row past the tokenizer's tokens (padding rows), else
    the highest special token that is not bos/eos/pad/unk, else the pad token. The drafter only needs a fixed
    row of the target's frozen embedding that real text rarely holds."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    for name in ("<|mask|>", "<|MASK|>", "<mask>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            return token_id
    if len(tokenizer) < vocab_size:
        return len(tokenizer)
    # NOTE: a special token the chat never uses (SmolLM2's <empty_output>), not bos/eos/pad/unk.
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    template = str(getattr(tokenizer, "chat_template", None) or "")
    added = {i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special = {i: tokenizer.convert_ids_to_tokens(i) for i in tokenizer.all_special_ids}
    spare = [i for i, text in {**added, **special}.items()
             if i not in reserved and i < vocab_size and text not in template]
    if spare:
        return max(spare)
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    raise ValueError("no mask token: the tokenizer has no mask or pad token and no unused vocabulary row; "
                     "pass --mask-token-id")


def drafter_config_for(target_config, train: TrainConfig, mask_token_id: int) -> DFlashDraftConfig:
    """A released-format drafter config for ``target_config`` (a transformers config)."""
    text = getattr(target_config, "text_config", None) or target_config
    num_layers = text.num_hidden_layers
    layer_ids = tuple(train.target_layer_ids or default_target_layer_ids(num_layers, train.num_draft_layers))
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    dflash = {"block_size": train.block_size, "mask_token_id": mask_token_id, "target_layer_ids": list(layer_ids)}
    softcap = getattr(text, "final_logit_softcapping", None)
    if softcap:
        dflash["final_logit_softcapping"] = float(softcap)
    if str(getattr(text, "model_type", "")).startswith("gemma"):
        dflash["input_embedding_scale"] = float(text.hidden_size) ** 0.5
    rope = getattr(text, "rope_parameters", None) or {}
    raw = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": train.block_size,
        "dflash_config": dflash, "dtype": "bfloat16", "hidden_act": "silu", "hidden_size": text.hidden_size,
        "head_dim": head_dim, "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "intermediate_size": text.intermediate_size, "num_hidden_layers": train.num_draft_layers,
        "layer_types": ["full_attention"] * train.num_draft_layers, "num_target_layers": num_layers,
        "rms_norm_eps": float(getattr(text, "rms_norm_eps", 1e-6)),
        "rope_theta": float(rope.get("rope_theta") or getattr(text, "rope_theta", None) or 10000.0),
        "max_position_embeddings": getattr(text, "max_position_embeddings", 40960), "attention_bias": False,
        "tie_word_embeddings": False, "vocab_size": text.vocab_size,
        "bos_token_id": getattr(text, "bos_token_id", None), "eos_token_id": getattr(text, "eos_token_id", None),
    }
    return DFlashDraftConfig.from_dict(raw)


def new_drafter(config: DFlashDraftConfig, seed: int) -> DFlashDrafter:
    """Fresh fp32 weights: linear layers N(0, 0.02) (transformers' Qwen3 ``initializer_range``), norms one."""
    torch.manual_seed(seed)
    drafter = DFlashDrafter(config)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    return drafter


def copy_target_layers(drafter: DFlashDrafter, target) -> list[int]:
    """Starts the drafter's ``n`` layers from the target's last ``n`` decoder layers (their projections and norms,
    and the final norm): the layers that map late hidden states to what the frozen LM head reads. A drafter layer
    holds exactly a Llama / Qwen3 decoder layer's parameters; q/k norms the target lacks (Llama) stay at one.
    Returns the target layer ids copied. Raises ValueError naming the parameters that do not match where the
    target's layers differ (biases, Gemma's extra norms and its ``1 + weight`` RMSNorm, other shapes)."""
    decoder = target.get_decoder()
    count = len(drafter.layers)
    first = len(decoder.layers) - count
    if first < 0:
        raise ValueError(f"copy_target_layers: the target has {len(decoder.layers)} layers, the drafter {count}")
    drafter_names = {name: param.shape for name, param in drafter.layers[0].named_parameters()}
    target_names = {name: param.shape for name, param in decoder.layers[first].named_parameters()}
    unmatched = sorted(name for name, shape in target_names.items() if drafter_names.get(name) != shape)
    if unmatched or str(getattr(target.config, "model_type", "")).startswith("gemma"):
        raise ValueError(f"copy_target_layers: a {target.config.model_type} decoder layer does not map onto a "
                         f"drafter layer (target parameters without a same-shaped drafter one: {unmatched}); "
                         "train from random weights instead")
    with torch.no_grad():
        for layer, source in zip(drafter.layers, decoder.layers[first:]):
            params = dict(layer.named_parameters())
            for name, param in source.named_parameters():
                params[name].copy_(param)
        drafter.norm.weight.copy_(decoder.norm.weight)
    return list(range(first, first + count))


def target_features(target, tokens: torch.Tensor, attention_mask: torch.Tensor,
                    layer_ids: Sequence[int]) -> torch.Tensor:
    """The target's ``hidden_states[i + 1]`` for ``i`` in ``layer_ids``, concatenated, of right-padded sequences.

    Args:
        tokens: [bs, S] int64; attention_mask: [bs, S] int64, 1 on real tokens (a prefix of each row, so the
            real tokens' positions and features are those of the sequence alone).
    Returns:
        [bs, S, len(layer_ids) * H], zero at padding positions.
    """
    with torch.no_grad():
        out = target(input_ids=tokens, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                     logits_to_keep=1)
        features = torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1)
        return features * attention_mask[..., None].to(features.dtype)


def pack_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int,
                 max_tokens: int | None) -> list[list[int]]:
    """Splits ``order`` into consecutive batches of at most ``batch_size`` sequences and, when ``max_tokens`` is
    set, at most ``max_tokens`` padded tokens (count x longest); a sequence over the cap forms a batch alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        grown = max(longest, lengths[index])
        full = len(current) == batch_size or (max_tokens is not None and grown * (len(current) + 1) > max_tokens)
        if current and full:
            batches.append(current)
            current, grown = [], lengths[index]
        current.append(index)
        longest = grown
    if current:
        batches.append(current)
    return batches


def lr_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return scale


def _generator(*seeds: int) -> torch.Generator:
    digest = hashlib.sha256(repr(seeds).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


class Trainer:
    """Owns the drafter, optimizer and scheduler of one run. Invariant: ``step`` optimizer steps are done and
    ``drafter``'s weights are the result; ``checkpoint()`` + ``Trainer(..., resume=True)`` restores exactly that."""

    def __init__(self, target, drafter: DFlashDrafter, sequences: list[TrainingSequence], train: TrainConfig,
                 out_dir: str, *, device: torch.device, resume: bool = False, progress: bool = True) -> None:
        self.target, self.drafter, self.sequences, self.train = target, drafter.to(device), sequences, train
        self.out_dir, self.device, self.progress = out_dir, device, progress
        self.embedding = target.get_input_embeddings().weight.detach()
        self.lm_head = target.get_output_embeddings().weight.detach()
        self.layer_forward = torch.compile(layer_forward, dynamic=True) if train.compile else layer_forward
        self._lengths = [len(seq.tokens) for seq in sequences]
        self._epoch: tuple[int, int, list[list[int]]] = (0, 0, self.epoch_batches(0))  # epoch, first step, batches
        # NOTE: with max_batch_tokens the epochs' batch counts differ slightly (other orders); epoch 0's is used.
        self.steps_per_epoch = len(self._epoch[2])
        self.total_steps = train.max_steps or max(1, round(train.epochs * self.steps_per_epoch))
        self.optimizer = torch.optim.AdamW(drafter.parameters(), lr=train.lr, betas=(0.9, 0.95),
                                           weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(self.total_steps, train.warmup_ratio))
        self.schedule_fitted = False
        self.step = 0
        self.history: list[dict] = []
        if resume:
            self._restore()

    # ----------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The sequence indices of each batch of ``epoch`` (see the module docstring)."""
        order = torch.randperm(len(self.sequences), generator=_generator(self.train.seed, epoch)).tolist()
        return pack_batches(order, self._lengths, self.train.batch_size, self.train.max_batch_tokens)

    def batch_indices(self, step: int) -> list[int]:
        epoch, first, batches = self._epoch
        if step < first:
            epoch, first, batches = 0, 0, self.epoch_batches(0)
        while step >= first + len(batches):
            epoch, first = epoch + 1, first + len(batches)
            batches = self.epoch_batches(epoch)
        self._epoch = (epoch, first, batches)
        return batches[step - first]

    def host_batch(self, step: int) -> Batch:
        """Step ``step``'s sequences and their seeded anchors, as a padded :class:`Batch` on the host."""
        anchors_gen = _generator(self.train.seed, 1_000_003, step)
        config = self.drafter.config
        sequences = [self.sequences[index] for index in self.batch_indices(step)]
        anchors = [sample_anchors(len(s.tokens), s.prompt_len, self.train.num_anchors, anchors_gen)
                   for s in sequences]
        return build_batch([s.tokens for s in sequences], anchors, config.block_size, config.mask_token_id,
                           self.train.gamma)

    def train_step(self) -> dict:
        """One optimizer step over one batch; the loss is the batch's weighted mean. The device work is queued
        without a host synchronisation; the logged numbers are read back once, at the end."""
        host = self.host_batch(self.step)
        num_tokens = int(host.attention_mask.sum())
        batch = host.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        layer_ids = self.drafter.config.target_layer_ids
        features = target_features(self.target, batch.tokens, batch.attention_mask, layer_ids)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            parts = batch_loss(self.drafter, self.embedding, self.lm_head, batch.blocks, features,
                               self.layer_forward)
        loss = parts.loss()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        logged = torch.stack([t.to(loss.device, torch.float64) for t in (
            loss.detach(), grad_norm, parts.num_correct, parts.num_scored, parts.num_first_correct, parts.num_blocks)
        ]).tolist()  # the step's one host read
        loss_value, norm, correct, scored, first, blocks = logged
        return {"step": self.step, "loss": loss_value, "grad_norm": norm, "lr": self.scheduler.get_last_lr()[0],
                "acc": correct / max(scored, 1), "acc_first": first / max(blocks, 1),
                "tokens": num_tokens}

    def fit_schedule(self, total_steps: int) -> None:
        """Sets the run's length to ``total_steps``, with warmup and cosine decay recomputed for it; the
        learning rates of the steps already taken stay as they were."""
        self.total_steps = total_steps
        self.scheduler.lr_lambdas = [lr_lambda(total_steps, self.train.warmup_ratio)] * len(
            self.optimizer.param_groups)
        self.schedule_fitted = True

    def run(self, until: int | None = None, on_step: Callable[[dict], None] | None = None,
            deadline: float | None = None, fit_schedule_to_deadline: bool = False,
            clock: Callable[[], float] = time.monotonic) -> list[dict]:
        """Trains to step ``until`` (default: the end), checkpointing every ``save_every`` steps and at the end;
        stops early, with a checkpoint, once ``clock()`` passes ``deadline``. With
        ``fit_schedule_to_deadline``, a run whose schedule is not yet fitted times its first steps and shortens
        the schedule to what fits before ``deadline`` (see the module docstring)."""
        from tqdm.auto import tqdm

        fit = fit_schedule_to_deadline and deadline is not None and not self.schedule_fitted
        fit_from, fit_to = self.step + FIT_SKIP_STEPS, self.step + FIT_SKIP_STEPS + FIT_AFTER_STEPS
        fit_start = 0.0
        until = min(until or self.total_steps, self.total_steps)
        self.drafter.train()
        bar = tqdm(total=until, initial=self.step, desc="train", disable=not self.progress, dynamic_ncols=True)
        start, tokens = time.perf_counter(), 0
        while self.step < until:
            if fit and self.step == fit_from:
                fit_start = clock()
            if fit and self.step == fit_to:
                now = clock()
                seconds_per_step = (now - fit_start) / FIT_AFTER_STEPS
                fitted = self.step + int(FIT_HEADROOM * (deadline - now) / seconds_per_step)
                self.fit_schedule(max(self.step + 1, min(fitted, self.total_steps)))
                until, fit = min(until, self.total_steps), False
                bar.total = until
            record = self.train_step()
            tokens += record["tokens"]
            record["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.1e}")
            bar.update(1)
            if on_step:
                on_step(record)
            out_of_time = deadline is not None and clock() > deadline
            if self.step % self.train.save_every == 0 or self.step == until or out_of_time:
                self.checkpoint()
            if out_of_time:
                break
        bar.close()
        return self.history

    # ----------------------------------------------------------------------------------------------
    def checkpoint(self) -> str:
        """Writes ``<out>/checkpoints/step-<n>/`` (the drafter in the released format + trainer state)."""
        path = os.path.join(self.out_dir, CHECKPOINTS, f"step-{self.step:07d}")
        save_drafter(self.drafter, path)
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "train": asdict(self.train),
                    "history": self.history, "total_steps": self.total_steps,
                    "schedule_fitted": self.schedule_fitted}, os.path.join(path, STATE_FILE))
        old = sorted(list_checkpoints(self.out_dir))[:-self.train.keep_checkpoints]
        for stale in old:
            for name in os.listdir(stale):
                os.remove(os.path.join(stale, name))
            os.rmdir(stale)
        return path

    def _restore(self) -> None:
        found = list_checkpoints(self.out_dir)
        if not found:
            return
        path = found[-1]
        state = torch.load(os.path.join(path, STATE_FILE), map_location=self.device, weights_only=False)
        weights = load_drafter(path, device=self.device)
        self.drafter.load_state_dict(weights.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        if state.get("schedule_fitted"):
            self.fit_schedule(state["total_steps"])

    def export(self, path: str | None = None) -> str:
        """The final drafter (bf16) in the released format at ``path`` (default: the run's folder)."""
        path = path or self.out_dir
        save_drafter(copy.deepcopy(self.drafter).to(torch.bfloat16), path)
        with open(os.path.join(path, "training_log.json"), "w", encoding="utf-8") as handle:
            json.dump({"train": asdict(self.train), "steps": self.step, "history": self.history}, handle, indent=1)
        return path


def list_checkpoints(out_dir: str) -> list[str]:
    root = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if os.path.exists(os.path.join(root, name, STATE_FILE)))


def evaluate_acceptance(target, drafter: DFlashDrafter, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                        stop_token_ids: Sequence[int] = ()) -> dict:
    """Greedy DFlash decoding with the reference decoder (``core/reference.py``): mean acceptance length
    (tokens per verify step, bonus included) over held-out prompts, and whether every output equals the target's."""
    from dflash_sglang.core.reference import generate

    was_training = drafter.training
    drafter.eval()
    results = generate(target, drafter, prompts, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)
    drafter.train(was_training)
    lengths = [n for r in results for n in r.acceptance_lengths]
    return {"num_prompts": len(prompts), "num_steps": len(lengths),
            "acceptance_length": sum(lengths) / max(len(lengths), 1),
            "tokens": sum(len(r.output_ids) for r in results)}
