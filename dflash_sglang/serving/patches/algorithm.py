# SPDX-License-Identifier: Apache-2.0
"""DFLASH as an SGLang speculative algorithm: the enum member and its worker, the command-line choice and
server defaults, the model registry entries, the refusal of requests DFLASH does not serve, the request
checks that keep one request from taking any server down (``request_safety``; and the logprob path that a mix of
``token_ids_logprob`` requests took down), and DFLASH's acceptance length in ``/server_info``."""

from __future__ import annotations

from dflash_sglang.serving.patches import ALGORITHM, is_dflash_server, patches


@patches(lambda module: module.SpeculativeAlgorithm)
def patch_spec_info(algorithm_enum) -> None:
    """Adds ``SpeculativeAlgorithm.DFLASH`` (no member replaced) and routes it to ``DFlashOverlapWorker`` under
    the overlap scheduler (DFLASH supports SGLang's spec v2), else to ``DFlashWorker``."""
    value = max(member.value for member in algorithm_enum) + 1
    member = object.__new__(algorithm_enum)
    member._name_ = ALGORITHM
    member._value_ = value
    member.__objclass__ = algorithm_enum
    algorithm_enum._member_map_[ALGORITHM] = member
    algorithm_enum._value2member_map_[value] = member
    algorithm_enum._member_names_.append(ALGORITHM)
    type.__setattr__(algorithm_enum, ALGORITHM, member)
    algorithm_enum.is_dflash = lambda self: self is member
    original_create_worker = algorithm_enum.create_worker
    original_supports_spec_v2 = algorithm_enum.supports_spec_v2

    def create_worker(self, server_args):
        if self is member:
            if server_args.disable_overlap_schedule:
                from dflash_sglang.serving.worker import DFlashWorker

                return DFlashWorker
            from dflash_sglang.serving.worker_overlap import DFlashOverlapWorker

            return DFlashOverlapWorker
        return original_create_worker(self, server_args)

    def supports_spec_v2(self) -> bool:
        return self is member or original_supports_spec_v2(self)

    algorithm_enum.create_worker = create_worker
    algorithm_enum.supports_spec_v2 = supports_spec_v2


@patches(lambda module: module.ServerArgs)
def patch_server_args(server_args_cls) -> None:
    """Accepts ``--speculative-algorithm DFLASH`` and applies DFLASH's defaults and checks."""
    original_add_cli_args = server_args_cls.add_cli_args
    original_handle = server_args_cls._handle_speculative_decoding

    def add_cli_args(parser) -> None:
        original_add_cli_args(parser)
        for action in parser._actions:
            if "--speculative-algorithm" in action.option_strings and action.choices is not None:
                if ALGORITHM not in action.choices:
                    action.choices = [*action.choices, ALGORITHM]

    def handle_speculative_decoding(self) -> None:
        if self.speculative_algorithm is not None and self.speculative_algorithm.upper() == ALGORITHM:
            from dflash_sglang.serving.server_defaults import apply_dflash_server_defaults

            self.speculative_algorithm = ALGORITHM
            apply_dflash_server_defaults(self)
        original_handle(self)

    server_args_cls.add_cli_args = staticmethod(add_cli_args)
    server_args_cls._handle_speculative_decoding = handle_speculative_decoding


@patches(lambda module: module.ModelRegistry)
def patch_model_registry(registry) -> None:
    """Registers ``dflash_sglang.serving.models`` (the drafter, and targets SGLang lacks), as
    ``SGLANG_EXTERNAL_MODEL_PACKAGE`` would."""
    registry.register("dflash_sglang.serving.models", overwrite=False)


@patches(lambda module: module.TokenizerManager)
def patch_tokenizer_manager(manager) -> None:
    """Wraps ``TokenizerManager._validate_one_request`` to answer with HTTP 400, on every server, requests
    that would fail inside SGLang's scheduler and take the server down (prompt token ids outside the
    vocabulary, NaN temperatures...: ``request_safety.py``), and on a DFLASH server the options DFLASH does
    not serve (``request_rules.py``)."""
    original_validate = manager._validate_one_request

    def validate_one_request(self, obj, input_ids):
        from dflash_sglang.serving import request_safety

        vocab_size = self.model_config.vocab_size
        if getattr(obj, "input_embeds", None) is None:
            request_safety.check_token_ids(input_ids, vocab_size)
        request_safety.check_sampling_values(obj.sampling_params)
        if hasattr(obj, "return_logprob"):
            request_safety.check_logprob_options(obj.return_logprob, obj.logprob_start_len, obj.top_logprobs_num,
                                                 obj.token_ids_logprob, vocab_size)
        original_validate(self, obj, input_ids)
        if is_dflash_server(self.server_args) and hasattr(obj, "return_logprob"):
            from dflash_sglang.serving.request_rules import check_request

            check_request(obj.sampling_params, getattr(obj, "custom_logit_processor", None),
                          self.server_args.grammar_backend)

    manager._validate_one_request = validate_one_request


@patches(lambda module: module.GenerateReqInput)
def patch_generate_req_input(request_cls) -> None:
    """Wraps ``GenerateReqInput._handle_parallel_sampling`` to refuse an ``n`` outside
    ``[1, request_safety.MAX_PARALLEL_SAMPLES]`` (HTTP 400) before SGLang copies the request n times."""
    original_handle = request_cls._handle_parallel_sampling

    def handle_parallel_sampling(self) -> None:
        from dflash_sglang.serving.request_safety import check_parallel_samples

        check_parallel_samples(self.sampling_params)
        original_handle(self)

    request_cls._handle_parallel_sampling = handle_parallel_sampling


@patches(lambda module: module.Scheduler)
def patch_scheduler(scheduler_cls) -> None:
    """Wraps ``Scheduler.get_internal_state`` so a DFLASH server's ``avg_spec_accept_length`` (``/server_info``,
    read by ``sglang.bench_serving``) counts every verify step: SGLang folds the steps into its lifetime totals
    only when it prints a decode log line (every ``--decode-log-interval`` = 40 decode batches), so a short
    run reported none and a long one missed its last steps."""
    original_get_internal_state = scheduler_cls.get_internal_state

    def get_internal_state(self, recv_req):
        output = original_get_internal_state(self, recv_req)
        if is_dflash_server(self.server_args):
            steps = self.spec_total_num_forward_ct + self.spec_num_forward_ct
            if steps > 0:
                tokens = self.spec_total_num_accepted_tokens + self.spec_num_accepted_tokens
                output.internal_state["avg_spec_accept_length"] = tokens / steps
        return output

    scheduler_cls.get_internal_state = get_internal_state


@patches(lambda module: module.OpenAIServingChat)
def patch_serving_chat(serving_chat) -> None:
    """Wraps ``OpenAIServingChat._process_logprobs_tokens`` so, on a DFLASH server, a streamed chunk's tokens
    each get their own top logprobs. Upstream streams with ``use_token_index=False``, which gives every token
    of a chunk the first one's list: right when a chunk holds one token (plain decoding), wrong for the several
    tokens a speculative step emits."""
    original_process = serving_chat._process_logprobs_tokens

    def process_logprobs_tokens(self, logprobs, use_token_index: bool = False):
        if is_dflash_server(self.tokenizer_manager.server_args):
            use_token_index = True
        return original_process(self, logprobs, use_token_index=use_token_index)

    serving_chat._process_logprobs_tokens = process_logprobs_tokens


@patches(lambda module: module)
def patch_token_ids_logprobs(logprob_module) -> None:
    """Keeps a batch that mixes requests with and without ``token_ids_logprob`` from taking the server down.

    ``get_token_ids_logprobs_raw`` (``layers/utils/logprob.py``), asked to leave its values on the device
    (``no_copy_to_cpu``, as SGLang's sampler does), gives a request without ids -- or a prefill without pruned
    positions -- a Python ``[]`` beside the other requests' tensors; the scheduler's output processor then calls
    ``.tolist()`` on every entry (``scheduler_output_processor_mixin``) and the AttributeError ends the scheduler,
    with or without speculation. An empty tensor instead reads back as the same ``[]``. The module's own callers
    (``get_token_ids_logprobs``, ``get_token_ids_logprobs_prefill``) look the function up at call time.
    """
    original = logprob_module.get_token_ids_logprobs_raw

    def get_token_ids_logprobs_raw(logprobs, token_ids_logprobs_list, stage, extend_logprob_pruned_lens_cpu=None,
                                   no_copy_to_cpu=False):
        values, indices = original(logprobs, token_ids_logprobs_list, stage, extend_logprob_pruned_lens_cpu,
                                   no_copy_to_cpu)
        if no_copy_to_cpu:
            values = [logprobs.new_empty(0) if isinstance(value, list) else value for value in values]
        return values, indices

    logprob_module.get_token_ids_logprobs_raw = get_token_ids_logprobs_raw
