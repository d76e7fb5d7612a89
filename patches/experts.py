"""vLLM's routed experts while a reply streams, not only once it has finished (--expert-view).

With `enable_return_routed_experts` vLLM 0.26 records every token's routing: each Gemma 4 MoE layer's router hands
its top-k ids to the worker's RoutedExpertsCapturer (`BaseRouter._select_experts`, after Gemma 4's custom routing
function and before the experts run, so whichever kernel computes the experts, ours of patches.small_batch included,
the ids are the ones they were given), the step's [tokens, layers, top_k] block is copied to the host with the step's
sampled tokens, and the scheduler sends each request its rows on every EngineCoreOutput (the prompt's on its first
token, then one row per token fed back). The frontend's OutputProcessor collects them per request
(`RequestState.routed_experts_chunks`) but hands them out only when the request finishes (`if finished and
self.routed_experts_chunks`); and when the consumer falls behind, `RequestOutput.add` merges streamed deltas keeping
the first one's `routed_experts`, so per-delta arrays would lose rows, and a final output merged into an earlier one
loses the whole routing (tests/test_experts.py shows both on vLLM's own classes).

`install` makes every streamed CompletionOutput carry the request's list of chunks itself, as `ATTR`: the list vLLM
appends to, not a copy, so there is nothing to merge and no per-step work beyond setting one attribute. The consumer
(engine.vllm_backend) keeps how many chunks it has counted and counts the new ones (`new_routing`). The output
processor and AsyncLLM's generate() run on the same event loop, so at the time the consumer reads the list holds
exactly the rows of the tokens handed out so far.

`install` also fixes what keeps vLLM 0.26 from recording Gemma 4's routing at all (`fix_manager`: its engine core
dies at start otherwise), in this process before vLLM forks the engine core from it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

log = logging.getLogger("patches")

ATTR = "routed_experts_so_far"  # on vllm.outputs.CompletionOutput: the request's routing chunks received so far
NOTE = "expert view: vLLM's routed experts handed out while a reply streams"


def supported() -> str | None:
    """None where this vLLM can return routed experts; else why not, for the user's notes."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        return "expert view: vLLM is not installed"
    if not hasattr(AsyncEngineArgs, "enable_return_routed_experts"):
        return "expert view: this vLLM cannot return routed experts (no enable_return_routed_experts)"
    return None


def install() -> str | None:
    """What --expert-view needs of this vLLM, installed before it forks its engine: Gemma 4's routing recorded at all
    (`fix_manager`), and the routing received so far on every streamed output. A line saying so, or None where this
    vLLM's output processor has no per-request chunks to expose (then the routing arrives only when a reply ends)."""
    if fixed := fix_manager():
        log.info(fixed)
    try:
        from vllm.v1.engine.output_processor import RequestState
    except ImportError:
        return None
    original = getattr(RequestState, "_new_completion_output", None)
    if original is None or "routed_experts_chunks" not in RequestState.__init__.__code__.co_names:
        return None  # a vLLM that collects the routing otherwise
    if getattr(original, "expert_view", False):
        return NOTE

    @functools.wraps(original)
    def _new_completion_output(self, token_ids, finish_reason, stop_reason):
        completion = original(self, token_ids, finish_reason, stop_reason)
        setattr(completion, ATTR, self.routed_experts_chunks)
        return completion

    _new_completion_output.expert_view = True
    RequestState._new_completion_output = _new_completion_output
    return NOTE


MANAGER_NOTE = "expert view: vLLM's routed-experts buffer sized with Gemma 4's top_k_experts"


def fix_manager() -> str | None:
    """vLLM 0.26's scheduler-side RoutedExpertsManager sizes its buffer with `_get_num_experts_per_tok`, which knows
    Gemma 4's `top_k_experts`, but its log line then reads `hf_config.num_experts_per_tok`, which Gemma4TextConfig
    lacks: the engine core dies at start with an AttributeError. While the manager is built, the text config gets a
    `num_experts_per_tok` of the value vLLM's own helper resolves, removed again right after. A line saying so, or
    None where this vLLM reads no such attribute."""
    try:
        from vllm.model_executor.layers.fused_moe import routed_experts_capturer as capturer
    except ImportError:
        return None
    manager = getattr(capturer, "RoutedExpertsManager", None)
    resolve = getattr(capturer, "_get_num_experts_per_tok", None)
    if manager is None or resolve is None or "num_experts_per_tok" not in manager.__init__.__code__.co_names:
        return None
    if getattr(manager.__init__, "expert_view", False):
        return MANAGER_NOTE
    original = manager.__init__

    @functools.wraps(original)
    def __init__(self, vllm_config, kv_cache_config):
        text = vllm_config.model_config.hf_text_config
        if hasattr(text, "num_experts_per_tok"):
            return original(self, vllm_config, kv_cache_config)
        text.num_experts_per_tok = resolve(text)
        try:
            original(self, vllm_config, kv_cache_config)
        finally:
            del text.num_experts_per_tok

    __init__.expert_view = True
    manager.__init__ = __init__
    return MANAGER_NOTE


def new_routing(completion: Any, seen: int) -> tuple[list[np.ndarray], int]:
    """The routing chunks of `completion`'s request that came after the first `seen`, and how many there are now.

    Without the patch (vLLM as it is, or `launch(patched=False)`) the whole routing comes once, with the finished
    output, if that output was not merged into an earlier one: then that is the one new chunk."""
    chunks = getattr(completion, ATTR, None)
    if chunks is not None:
        return chunks[seen:], len(chunks)
    if completion.finish_reason is not None and completion.routed_experts is not None and seen == 0:
        return [completion.routed_experts], 1
    return [], seen
