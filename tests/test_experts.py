"""--expert-view on CPU: the counts themselves (engine.experts), the transformers backend's counts against the routing
recomputed from the tiny model's router weights, and the vLLM side: engine arguments, and patches.experts driven by
vLLM's real OutputProcessor (the frontend half of vLLM, which runs on CPU; only the engine core that fills in the
routing needs the GPU: tests/test_gpu_experts.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import types

import numpy as np
import pytest
import torch

import patches.experts
from engine import model_source, transformers_backend, vllm_launch
from engine.base import Delta, GenerationRequest, SamplingOptions
from engine.experts import ExpertCounts, ExpertSummary, normalized_entropy
from engine.settings import EngineSettings
from engine.transformers_backend import TransformersEngine, moe_routers
from engine.vllm_backend import VllmEngine, expert_shape, routed_prompt_start, sampling_params
from engine.vllm_launch import GpuFacts, engine_args

L, E, K = 3, 8, 2  # layers, experts, top_k of the hand-made routing below


def rows(*tokens: list[list[int]]) -> np.ndarray:
    """Routing rows [tokens, layers, top_k] from one [layers][top_k] list per token."""
    return np.array(tokens, dtype=np.uint8)


def reference_counts(routing: np.ndarray, experts: int) -> np.ndarray:
    """The plain-loop count of routing [tokens, layers, top_k]: [layers, experts]."""
    counts = np.zeros((routing.shape[1], experts), dtype=np.int64)
    for token in routing:
        for layer, chosen in enumerate(token):
            for expert in chosen:
                counts[layer, expert] += 1
    return counts


# ------------------------------------------------------------------------------------------- ExpertCounts


def test_counts_split_prompt_and_reply_rows_in_token_order_whatever_the_chunks():
    rng = np.random.default_rng(0)
    routing = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(11)])
    whole = ExpertCounts.empty(L, E, K, prompt_size=4).add(routing)
    chunked = ExpertCounts.empty(L, E, K, prompt_size=4)
    for start, end in [(0, 3), (3, 5), (5, 6), (6, 11)]:  # a chunk that straddles the prompt's end
        chunked = chunked.add(routing[start:end])
    for counts in (whole, chunked):
        assert np.array_equal(counts.prompt, reference_counts(routing[:4], E))
        assert np.array_equal(counts.generated, reference_counts(routing[4:], E))
        assert (counts.prompt_tokens, counts.generated_tokens, counts.uncaptured) == (4, 7, 0)
        assert counts.total.sum() == 11 * L * K and counts.generated.sum() == 7 * L * K
    assert whole == chunked


def test_counts_are_values_each_add_makes_a_new_one():
    empty = ExpertCounts.empty(L, E, K)
    one = empty.add(rows([[0, 1], [2, 3], [4, 5]]))
    two = one.add(rows([[0, 7], [2, 6], [4, 1]]))
    assert empty.generated.sum() == 0 and one.generated.sum() == L * K and two.generated.sum() == 2 * L * K
    assert one.generated[0, 0] == 1 and two.generated[0, 0] == 2
    with pytest.raises(ValueError):
        one.generated[0, 0] = 5  # read-only: a Delta's counts never change under the UI
    assert one.add(np.zeros((0, L, K), dtype=np.uint8)) is one
    assert one != two and one == empty.add(rows([[0, 1], [2, 3], [4, 5]]))


def test_a_row_of_zeros_is_routing_that_was_not_captured_not_expert_0():
    counts = ExpertCounts.empty(L, E, K).add(rows([[0, 1], [0, 0], [3, 0]]))
    assert counts.uncaptured == 1
    assert counts.generated[:, 0].tolist() == [1, 0, 1] and counts.generated.sum() == (L - 1) * K


def test_routing_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="shape"):
        ExpertCounts.empty(L, E, K).add(np.zeros((2, L, K + 1), dtype=np.uint8))


def test_normalized_entropy_is_1_for_uniform_0_for_one_expert():
    assert normalized_entropy(np.full(8, 5)) == pytest.approx(1.0)
    assert normalized_entropy(np.array([7, 0, 0, 0])) == 0.0
    assert normalized_entropy(np.zeros(8)) is None
    # one token routed to k of E experts: log k / log E
    assert normalized_entropy(np.array([1, 1, 0, 0, 0, 0, 0, 0])) == pytest.approx(math.log(2) / math.log(8))


def test_summary_names_the_busiest_experts_and_how_spread_each_layer_is():
    # layer 0: every token to experts 0 and 1; layer 1: spread over all 8; layer 2: 4 tokens over 4 pairs
    layer1 = [[0, 1], [2, 3], [4, 5], [6, 7]]
    layer2 = [[2, 3], [2, 4], [2, 5], [2, 6]]
    counts = ExpertCounts.empty(L, E, K).add(rows(*[[[0, 1], layer1[t], layer2[t]] for t in range(4)]))
    summary = counts.summary(top=3)
    assert isinstance(summary, ExpertSummary) and summary.tokens == 4
    assert summary.top == ((0, 0, 1.0), (0, 1, 1.0), (2, 2, 1.0))  # (layer, expert, share of tokens)
    assert summary.per_layer[0] == ((0, 1.0), (1, 1.0))
    assert summary.per_layer[1] == ((0, 0.25), (1, 0.25), (2, 0.25))
    assert summary.per_layer[2][0] == (2, 1.0)
    assert summary.spread[0] == pytest.approx(math.log(2) / math.log(8))
    assert summary.spread[1] == pytest.approx(1.0)
    assert summary.mean_spread == pytest.approx(sum(summary.spread) / 3)
    assert summary.experts_used == (2, 8, 5)
    assert counts.summary("prompt").spread == (None, None, None) and counts.summary("prompt").mean_spread is None


def test_summary_of_the_prompt_or_of_everything():
    counts = ExpertCounts.empty(L, E, K, prompt_size=1).add(rows([[0, 1], [0, 1], [0, 1]], [[2, 3], [2, 3], [2, 3]]))
    assert counts.summary("prompt").top[0] == (0, 0, 1.0)
    assert counts.summary("generated").top[0] == (0, 2, 1.0)
    assert counts.summary("all").tokens == 2 and counts.summary("all").top[0] == (0, 0, 0.5)


# ----------------------------------------------------------------------------------------- transformers


def started(checkpoint, **settings) -> TransformersEngine:
    engine = TransformersEngine(EngineSettings(model=str(checkpoint), backend="transformers", **settings))
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def viewing(tiny_model_dir):
    engine = started(tiny_model_dir, expert_view=True)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    engine = started(tiny_model_dir)
    yield engine
    asyncio.run(engine.shutdown())


def chat(text: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], SamplingOptions(temperature=0, max_tokens=max_tokens))


class RouterInputs:
    """A forward pre-hook on each router keeps the hidden states it is given; `routing` recomputes the top-k from the
    router's weights (Gemma 4: RMS norm without weight, x scale / sqrt(hidden), proj, softmax, top-k), independently
    of the engine's hook on the router's output."""

    def __init__(self, model):
        self.routers = dict(moe_routers(model))
        self.inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.routers}
        self._handles = [
            router.register_forward_pre_hook(lambda m, args, layer=layer: self.inputs[layer].append(args[0].detach()))
            for layer, router in self.routers.items()
        ]

    def remove(self):
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def probabilities(self) -> torch.Tensor:
        """[tokens, layers, experts]: each router's softmax over its experts, from its weights."""
        per_layer = []
        for layer, router in sorted(self.routers.items()):
            hidden = torch.cat(self.inputs[layer])
            x = router.norm(hidden) * router.scale * router.scalar_root_size
            scores = torch.nn.functional.linear(x, router.proj.weight)
            per_layer.append(torch.softmax(scores, dim=-1, dtype=torch.float32))
        return torch.stack(per_layer, dim=1)

    def routing(self, top_k: int) -> np.ndarray:
        """[tokens, layers, top_k]: the experts each router chooses."""
        return torch.topk(self.probabilities(), k=top_k, dim=-1).indices.cpu().numpy()

    def margins(self, top_k: int) -> np.ndarray:
        """[tokens, layers]: how far the k-th choice's probability is above the next expert's, relative to it (near 0:
        a near tie, which rounding elsewhere may flip)."""
        best = torch.topk(self.probabilities(), k=top_k + 1, dim=-1).values
        return ((best[..., -2] - best[..., -1]) / best[..., -2]).cpu().numpy()


async def reply(engine, request) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


async def idle(engine):
    for _ in range(250):  # the worker removes its hooks and frees the model right after its last token
        if engine.stats().running == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the generation did not end")


async def test_transformers_counts_are_the_routers_choices_on_the_same_hidden_states(viewing):
    layers, experts, top_k = viewing._expert_shape
    probe = RouterInputs(viewing._model)
    try:
        deltas = await reply(viewing, chat("Tell me about the river.", max_tokens=24))
    finally:
        probe.remove()
    last = deltas[-1]
    prompt, output = last.metrics.prompt_tokens, last.metrics.output_tokens
    routing = probe.routing(top_k)
    assert routing.shape == (prompt + output - 1, layers, top_k)  # the last token is never fed back
    counts = last.experts
    assert np.array_equal(counts.prompt, reference_counts(routing[:prompt], experts))
    assert np.array_equal(counts.generated, reference_counts(routing[prompt:], experts))
    assert (counts.prompt_tokens, counts.generated_tokens, counts.uncaptured) == (prompt, output - 1, 0)
    assert counts.total.sum() == (prompt + output - 1) * layers * top_k
    # live: every delta carries the counts so far, growing with the reply
    generated = [d.experts.generated_tokens for d in deltas]
    assert generated == sorted(generated) and generated[0] <= 1
    assert all(d.experts.prompt_tokens == prompt for d in deltas)


async def test_transformers_counts_only_the_prompts_last_tokens(viewing, monkeypatch):
    monkeypatch.setattr(transformers_backend, "PROMPT_TOKENS", 10)
    _, experts, top_k = viewing._expert_shape
    probe = RouterInputs(viewing._model)
    try:
        last = (await reply(viewing, chat("Tell me about the river and the mountain.", max_tokens=8)))[-1]
    finally:
        probe.remove()
    routing, prompt = probe.routing(top_k), last.metrics.prompt_tokens
    assert prompt > 10 and last.experts.prompt_tokens == 10 and last.experts.prompt_size == 10
    assert np.array_equal(last.experts.prompt, reference_counts(routing[prompt - 10 : prompt], experts))
    assert np.array_equal(last.experts.generated, reference_counts(routing[prompt:], experts))


async def test_transformers_hooks_live_only_while_a_reply_is_generated(viewing):
    routers = [router for _, router in moe_routers(viewing._model)]
    stream = viewing.generate(chat("Hello", max_tokens=200))
    await anext(stream)
    assert all(len(router._forward_hooks) == 1 for router in routers)
    await stream.aclose()
    await idle(viewing)
    assert all(not router._forward_hooks for router in routers)


async def test_with_the_view_off_no_hook_and_no_counts(plain):
    assert plain._expert_shape is None
    routers = [router for _, router in moe_routers(plain._model)]
    assert routers
    deltas = []
    async for delta in plain.generate(chat("Tell me about the river.", max_tokens=16)):
        assert all(not router._forward_hooks for router in routers)
        deltas.append(delta)
    assert deltas and all(d.experts is None for d in deltas)


# -------------------------------------------------------------------------------------------- vLLM args


HOPPER = GpuFacts((9, 0), "NVIDIA H100")


@pytest.fixture
def tiny(tiny_model_dir):
    return model_source.inspect(tiny_model_dir)


def test_off_the_engine_arguments_are_as_without_the_view(tiny):
    default = engine_args(EngineSettings(model=str(tiny.path)), tiny, HOPPER, [])
    off = engine_args(EngineSettings(model=str(tiny.path), expert_view=False), tiny, HOPPER, [])
    assert off == default and off.enable_return_routed_experts is False


def test_on_vllm_records_the_routing_of_the_tiny_model(tiny):
    notes = []
    args = engine_args(EngineSettings(model=str(tiny.path), max_model_len=512, expert_view=True), tiny, HOPPER, notes)
    assert args.enable_return_routed_experts is True and not notes
    config = args.create_model_config()
    assert config.enable_return_routed_experts and expert_shape(config) == (2, 8, 2)
    off = engine_args(EngineSettings(model=str(tiny.path), max_model_len=512), tiny, HOPPER, []).create_model_config()
    assert expert_shape(off) is None


def test_the_patch_is_installed_only_with_the_view_on(tiny, vllm_as_is):
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsManager
    from vllm.v1.engine.output_processor import RequestState

    original, manager = RequestState._new_completion_output, RoutedExpertsManager.__init__
    vllm_launch.install_expert_view(engine_args(EngineSettings(model=str(tiny.path)), tiny, HOPPER, []), [])
    assert RequestState._new_completion_output is original and RoutedExpertsManager.__init__ is manager
    notes = []
    args = engine_args(EngineSettings(model=str(tiny.path), expert_view=True), tiny, HOPPER, notes)
    vllm_launch.install_expert_view(args, notes)
    assert RequestState._new_completion_output is not original and not notes
    assert RoutedExpertsManager.__init__ is not manager
    patched = RequestState._new_completion_output
    assert patches.experts.install() == patches.experts.NOTE and RequestState._new_completion_output is patched


@pytest.fixture
def manager_as_is(vllm_as_is):
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsManager

    return RoutedExpertsManager


def test_vllms_routed_experts_buffer_for_gemma_4_needs_the_fix(tiny, manager_as_is):
    """vLLM 0.26's scheduler builds this at start with enable_return_routed_experts; its log line reads a
    num_experts_per_tok that Gemma 4's config lacks."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    config = engine_args(EngineSettings(model=str(tiny.path), max_model_len=512, expert_view=True), tiny, HOPPER, [])
    vllm_config = types.SimpleNamespace(model_config=config.create_model_config())
    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16)
    kv_cache = KVCacheConfig(num_blocks=4, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["a"], spec)])
    with pytest.raises(AttributeError, match="num_experts_per_tok"):
        manager_as_is(vllm_config, kv_cache)
    assert patches.experts.fix_manager() == patches.experts.MANAGER_NOTE
    manager = manager_as_is(vllm_config, kv_cache)
    assert manager.routed_experts_by_slot.shape == (4 * 16, 2, 2)  # slots, layers, top_k
    assert not hasattr(vllm_config.model_config.hf_text_config, "num_experts_per_tok")  # the config as it was


def test_sampling_leaves_out_all_but_the_prompts_last_tokens_from_the_routing():
    assert sampling_params(SamplingOptions()).routed_experts_prompt_start == 0  # vLLM's default
    assert sampling_params(SamplingOptions(), routed_prompt_start=7).routed_experts_prompt_start == 7
    assert routed_prompt_start({"prompt": "x", "prompt_token_ids": list(range(5000))}) == 5000 - 4096
    assert routed_prompt_start({"prompt": "x", "prompt_token_ids": [1, 2, 3]}) == 0
    assert routed_prompt_start({"prompt": "<|image|>", "multi_modal_data": {}}) == 0  # length known only in vLLM


# ---------------------------------------------------- vLLM's output processor (real) under patches.experts

PROMPT = list(range(2, 7))  # 5 prompt tokens


def core_request(request_id: str = "chat-1"):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine import EngineCoreRequest

    params = SamplingParams(max_tokens=100, detokenize=False, output_kind=RequestOutputKind.DELTA)
    request = EngineCoreRequest(
        request_id=f"{request_id}-abcd1234",  # vLLM's internal id
        prompt_token_ids=PROMPT,
        mm_features=None,
        sampling_params=params,
        pooling_params=None,
        arrival_time=time.time(),
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=None,
    )
    request.external_req_id = request_id
    return request


def step(request_id: str, token: int, routing: np.ndarray, finished: bool = False):
    """What vLLM's scheduler sends for one step of the request: the new token and its rows of routing."""
    from vllm.v1.engine import EngineCoreOutput, FinishReason

    return EngineCoreOutput(
        request_id=f"{request_id}-abcd1234",
        new_token_ids=[token],
        routed_experts=routing,
        finish_reason=FinishReason.LENGTH if finished else None,
    )


def scheduled_routing(seed: int = 0) -> list[np.ndarray]:
    """The scheduler's chunks for a 6-token reply: the prompt's rows with the first token, then one row per token
    fed back (uint8, as RoutedExpertsManager keeps them)."""
    rng = np.random.default_rng(seed)
    pick = lambda n: np.stack(  # noqa: E731
        [np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(n)]
    ).astype(np.uint8)
    return [pick(len(PROMPT))] + [pick(1) for _ in range(5)]


class FakeAsyncLLM:
    """AsyncLLM's generate() over vLLM's own OutputProcessor and RequestOutputCollector (its merging included); only
    the engine core is replaced: it sends `chunks` of routing with one token each, in `groups` of steps processed
    before the consumer reads again (a group of several: a consumer that fell behind)."""

    def __init__(self, chunks: list[np.ndarray], groups: list[int] | None = None):
        from vllm.v1.engine.output_processor import OutputProcessor

        self.processor = OutputProcessor(None, log_stats=True)
        self.chunks = chunks
        self.groups = groups or [1] * len(chunks)
        self.errored = False
        self.sampling = None

    def generate(self, prompt, params, request_id, tokenization_kwargs=None):
        self.sampling = params
        return self._stream(params, request_id)

    async def _stream(self, params, request_id):
        from vllm.v1.engine.output_processor import RequestOutputCollector

        request = core_request(request_id)
        queue = RequestOutputCollector(params.output_kind, request.request_id)
        self.processor.add_request(request, None, queue=queue)
        last = len(self.chunks) - 1
        outputs = [step(request_id, 10 + i, chunk, finished=i == last) for i, chunk in enumerate(self.chunks)]
        for size in self.groups:
            batch, outputs = outputs[:size], outputs[size:]
            self.processor.process_outputs(batch)
            out = queue.get_nowait() or await queue.get()
            yield out
            if out.finished:
                return


def vllm_engine(llm: FakeAsyncLLM, expert_view: bool = True) -> VllmEngine:
    engine = VllmEngine(EngineSettings(expert_view=expert_view))
    engine._llm = llm
    engine._expert_shape = (L, E, K) if expert_view else None  # what start() reads from vLLM's model config
    return engine


async def vllm_reply(engine: VllmEngine) -> list[Delta]:
    request = GenerationRequest([{"role": "user", "content": "hi"}], SamplingOptions(max_tokens=100))
    engine._counted[request.request_id] = {"prompt": "hi", "prompt_token_ids": PROMPT}  # as count_prompt_tokens left
    return [delta async for delta in engine.generate(request)]


@pytest.fixture
def vllm_as_is(monkeypatch):
    """vLLM's output processor and routed-experts buffer without patches.experts, restored after the test."""
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsManager
    from vllm.v1.engine.output_processor import RequestState

    method = RequestState._new_completion_output
    monkeypatch.setattr(RequestState, "_new_completion_output", getattr(method, "__wrapped__", method))
    init = RoutedExpertsManager.__init__
    monkeypatch.setattr(RoutedExpertsManager, "__init__", getattr(init, "__wrapped__", init))


@pytest.fixture
def patched_vllm(vllm_as_is):
    assert patches.experts.install() == patches.experts.NOTE


@pytest.mark.parametrize("consumer", ["keeps up", "falls behind"])
def test_vllm_alone_hands_out_the_routing_only_when_the_reply_ends_if_at_all(vllm_as_is, consumer):
    """Why the patch: streamed outputs carry no routing, and when the consumer falls behind, merging the deltas
    keeps the first one's `routed_experts` (None), so even the final routing is lost."""
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

    chunks = scheduled_routing()
    processor = OutputProcessor(None, log_stats=False)
    request = core_request()
    queue = RequestOutputCollector(request.sampling_params.output_kind, request.request_id)
    processor.add_request(request, None, queue=queue)
    outputs = [step("chat-1", 10 + i, chunk, i == 5) for i, chunk in enumerate(chunks)]
    received = []
    for i, output in enumerate(outputs):
        processor.process_outputs([output])
        if consumer == "keeps up" or i in (0, 5):
            received.append(queue.get_nowait().outputs[0])
    assert all(c.routed_experts is None for c in received[:-1])
    final = received[-1]
    if consumer == "keeps up":
        assert np.array_equal(final.routed_experts, np.concatenate(chunks))  # the whole request, once, at the end
    else:
        assert final.token_ids == [11, 12, 13, 14, 15] and final.routed_experts is None


def test_the_patch_hands_each_streamed_output_the_requests_routing_so_far(patched_vllm):
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

    chunks = scheduled_routing()
    processor = OutputProcessor(None, log_stats=False)
    request = core_request()
    queue = RequestOutputCollector(request.sampling_params.output_kind, request.request_id)
    processor.add_request(request, None, queue=queue)
    processor.process_outputs([step("chat-1", 10, chunks[0])])
    assert len(getattr(queue.get_nowait().outputs[0], patches.experts.ATTR)) == 1
    processor.process_outputs([step("chat-1", 11, chunks[1])])
    processor.process_outputs([step("chat-1", 12, chunks[2])])  # merged into the previous output
    merged = queue.get_nowait().outputs[0]
    assert merged.token_ids == [11, 12] and len(getattr(merged, patches.experts.ATTR)) == 3
    new, seen = patches.experts.new_routing(merged, 1)
    assert seen == 3 and [c.tolist() for c in new] == [c.tolist() for c in chunks[1:3]]


async def test_vllm_deltas_count_the_routing_so_far_even_when_outputs_merge(patched_vllm):
    chunks = scheduled_routing()
    llm = FakeAsyncLLM(chunks, groups=[1, 3, 1, 1])  # the consumer fell behind by two steps once
    deltas = await vllm_reply(vllm_engine(llm))
    assert llm.sampling.routed_experts_prompt_start == 0  # a 5-token prompt is counted whole
    assert len(deltas) == 4 and deltas[-1].finish_reason == "length"
    for delta, received in zip(deltas, [1, 4, 5, 6], strict=True):
        counts = delta.experts
        assert np.array_equal(counts.prompt, reference_counts(chunks[0], E))
        fed_back = np.concatenate([chunks[0][:0], *chunks[1:received]])
        assert np.array_equal(counts.generated, reference_counts(fed_back, E))
        assert (counts.prompt_tokens, counts.generated_tokens, counts.uncaptured) == (len(PROMPT), received - 1, 0)
    assert deltas[-1].experts.total.sum() == (len(PROMPT) + 5) * L * K  # 6 tokens out, 5 fed back


async def test_unpatched_vllm_counts_arrive_with_the_last_delta(vllm_as_is):
    chunks = scheduled_routing(1)
    deltas = await vllm_reply(vllm_engine(FakeAsyncLLM(chunks)))
    assert len(deltas) == 6 and all(d.experts.total.sum() == 0 for d in deltas[:-1])
    assert np.array_equal(deltas[-1].experts.total, reference_counts(np.concatenate(chunks), E))


async def test_vllm_engine_with_the_view_off_asks_and_attaches_nothing(patched_vllm):
    llm = FakeAsyncLLM(scheduled_routing())
    deltas = await vllm_reply(vllm_engine(llm, expert_view=False))
    assert len(deltas) == 6 and all(d.experts is None for d in deltas)
    assert llm.sampling.routed_experts_prompt_start == 0  # vLLM's default: nothing asked of it


def test_a_delta_carries_no_counts_unless_given():
    assert Delta().experts is None and dataclasses.fields(Delta)[-1].name == "experts"


def test_the_flag_is_off_by_default_and_reaches_the_settings():
    import argparse

    from engine import settings

    parser = argparse.ArgumentParser()
    settings.add_flags(parser)
    assert settings.from_flags(parser.parse_args([])).expert_view is False
    on = settings.from_flags(parser.parse_args(["--expert-view"]))
    assert on.expert_view is True and settings.to_argv(on) == ["--expert-view"]
    assert EngineSettings.from_json(on.to_json()) == on
    assert settings.flags()["expert_view"].backends == ("vllm", "transformers")
