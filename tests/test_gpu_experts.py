"""--expert-view in vLLM on a GPU: the counts against the routing recomputed from the checkpoint's router weights, and
what the view costs one stream's decoding.

    python -m pytest -m gpu tests/test_gpu_experts.py -s      # prints agreement and tok/s with the view on and off

What is checked, and why so. vLLM does not hand out hidden states, so the routing can't be recomputed inside vLLM;
transformers can recompute it, teacher-forced on vLLM's own tokens (prompt + reply), from the router weights on each
layer's hidden states (tests.test_experts.RouterInputs). Three things are checked:
1. the live counts equal a count of every routing row vLLM sent for the request (nothing lost when outputs merge, no
   row counted twice, prompt and reply split where the prompt ends), and no row came without routing;
2. row i of that routing is token i's routing, the router's choice from its weights: the (token, layer) top-k sets
   agree with transformers' recomputation (fp32, teacher-forced on vLLM's tokens). Not all of them: the tiny model's
   random routers score their experts within a few thousandths of each other, and bf16 against fp32 alone (both in
   transformers, CPU) flips 6-8 % of the rows, ~1 % of those whose k-th choice leads the next by more than 0.5 %. So
   the bounds: 85 % of all rows, 95 % of the clear ones; a routing off by one token agrees on ~20 % (adjacent tokens
   route alike), a wrong one on ~1 in C(8, 2) = 28;
3. the full 26B-A4B config in NVFP4 (dummy weights, Marlin + our small-batch MoE kernels on an H200): every token of
   every layer has its 8 distinct experts, and one stream decodes within 3 % of the rate with the view off.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

import patches.experts
from bench.checkpoints import write_full_size_checkpoint
from engine.base import GenerationRequest, SamplingOptions, Stage
from engine.settings import EngineSettings
from engine.vllm_backend import VllmEngine
from tests.test_experts import RouterInputs, reference_counts

pytestmark = pytest.mark.gpu

# Of (token, layer) top-k sets, vLLM bf16 against transformers fp32 on the same tokens: all rows, and the rows whose
# k-th choice leads the next expert by more than CLEAR (relative); transformers bf16 vs fp32 on CPU: 0.94 and 0.99.
AGREEMENT, CLEAR_AGREEMENT, CLEAR = 0.85, 0.95, 0.005
COST = 0.03  # one-stream decode with the view on may be this much slower than off


async def started(settings: EngineSettings) -> VllmEngine:
    engine = VllmEngine(settings)
    await engine.start()
    assert engine.status().stage is Stage.READY
    return engine


def request(prompt: str, max_tokens: int, ignore_eos: bool = False) -> GenerationRequest:
    return GenerationRequest(
        [{"role": "user", "content": prompt}],
        SamplingOptions(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos),
    )


class Recorder:
    """What the engine read from vLLM's outputs: every routing chunk and output token, in order."""

    def __init__(self, monkeypatch):
        self.chunks: list[np.ndarray] = []
        self.tokens: list[int] = []
        original = patches.experts.new_routing

        def recording(completion, seen):
            self.tokens += list(completion.token_ids)
            new, seen = original(completion, seen)
            self.chunks += [np.array(c) for c in new]
            return new, seen

        monkeypatch.setattr(patches.experts, "new_routing", recording)

    @property
    def routing(self) -> np.ndarray:
        return np.concatenate(self.chunks)


def same_sets(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of (token, layer) rows whose top-k sets are equal."""
    return float((np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(axis=-1).mean())


async def test_tiny_counts_are_the_routing_recomputed_from_the_router_weights(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    recorder = Recorder(monkeypatch)
    engine = await started(
        EngineSettings(
            model=str(tiny_model_dir),
            max_model_len=2048,
            gpu_memory_utilization=0.3,
            kv_cache_dtype="auto",  # bf16: fp8 would round the attention's keys and values further from fp32's
            expert_view=True,
        )
    )
    try:
        ask = request("Tell me about the river and the mountain.", max_tokens=200)
        engine.count_prompt_tokens(ask)  # renders the prompt and keeps it for generate(): read its ids here
        prompt_ids = list(engine._counted[ask.request_id]["prompt_token_ids"])
        deltas = [delta async for delta in engine.generate(ask)]
    finally:
        await engine.shutdown()
    last = deltas[-1]
    counts, n = last.experts, last.metrics.output_tokens
    layers, experts, top_k = counts.layers, counts.experts, counts.top_k
    routing = recorder.routing
    prompt = len(prompt_ids)
    assert (layers, experts, top_k) == (2, 8, 2) and len(recorder.tokens) == n
    # 1. the live counts are every row vLLM sent, split where the prompt ends
    assert routing.shape == (prompt + n - 1, layers, top_k)
    assert np.array_equal(counts.prompt, reference_counts(routing[:prompt], experts))
    assert np.array_equal(counts.generated, reference_counts(routing[prompt:], experts))
    assert (counts.prompt_tokens, counts.generated_tokens, counts.uncaptured) == (prompt, n - 1, 0)
    assert [d.experts.generated_tokens for d in deltas] == sorted(d.experts.generated_tokens for d in deltas)
    # 2. row i is token i's routing: recomputed from the router weights on transformers' hidden states
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    probe = RouterInputs(model)
    with torch.no_grad():
        model(torch.tensor([prompt_ids + recorder.tokens[:-1]]))
    probe.remove()
    recomputed, margins = probe.routing(top_k), probe.margins(top_k)
    agreement = same_sets(routing, recomputed)
    clear = margins > CLEAR
    clear_agreement = same_sets(routing[clear], recomputed[clear])
    shifted = same_sets(routing[1:], recomputed[:-1])
    print(
        f"\ntiny expert view: {prompt} prompt + {n - 1} reply rows x {layers} layers; top-{top_k} sets equal to the "
        f"transformers fp32 recomputation: {agreement:.3f} of all rows, {clear_agreement:.3f} of the "
        f"{clear.mean():.0%} with a clear choice; shifted by one token: {shifted:.3f}"
    )
    assert agreement >= AGREEMENT and clear_agreement >= CLEAR_AGREEMENT and shifted < 0.5


async def test_full_size_nvfp4_decode_with_the_view_on_is_within_3_percent_of_off(
    tiny_vision_model_dir, tmp_path, monkeypatch
):
    """Both engines at once (each a share of the GPU), measured in turns, so that clocks and temperature drift alike
    for both; the rate is vLLM's (engine-core timestamps of the first and last token, the sidebar's tok/s), with the
    rate at which the Deltas reached this consumer beside it."""
    folder = write_full_size_checkpoint(
        tmp_path / "gemma4-26b-a4b-nvfp4", tokenizer_from=tiny_vision_model_dir, nvfp4=True
    )
    recorder = Recorder(monkeypatch)
    engines: dict[bool, VllmEngine] = {}
    rates: dict[bool, list[float]] = {False: [], True: []}
    arrived: dict[bool, list[float]] = {False: [], True: []}
    last = {}
    try:
        for view in (False, True):
            engines[view] = await started(
                EngineSettings(model=str(folder), load_format="dummy", gpu_memory_utilization=0.42, expert_view=view)
            )
        prompt = " ".join(f"word{i}" for i in range(300))
        for view in (False, True):
            [_ async for _ in engines[view].generate(request(prompt, 16))]  # warm-up
        for _ in range(3):
            for view in (False, True):
                stamps, deltas = [], []
                async for delta in engines[view].generate(request(prompt, 1000, ignore_eos=True)):
                    stamps.append(time.perf_counter())
                    deltas.append(delta)
                first, final = deltas[0].metrics, deltas[-1].metrics
                assert final.output_tokens == 1000
                rates[view].append(final.decode_tok_s)
                arrived[view].append((final.output_tokens - first.output_tokens) / (stamps[-1] - stamps[0]))
                last[view] = deltas[-1]
        notes = engines[True].notes
    finally:
        for engine in engines.values():
            await engine.shutdown()
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(
        f"\n26B-A4B NVFP4 dummy, one stream, 1000 tokens, 3 turns each: decode {off:.1f} tok/s with the view off, "
        f"{on:.1f} on ({(on / off - 1) * 100:+.2f} %); Deltas reached the consumer at "
        f"{statistics.median(arrived[False]):.1f} / {statistics.median(arrived[True]):.1f} tok/s; "
        f"runs off {[round(r, 1) for r in rates[False]]}, on {[round(r, 1) for r in rates[True]]}; notes: {notes}"
    )
    counts, prompt_tokens = last[True].experts, last[True].metrics.prompt_tokens
    assert last[False].experts is None
    assert (counts.layers, counts.experts, counts.top_k) == (30, 128, 8)
    # every token of every layer routed to 8 distinct experts (a kernel that routed inside itself would leave zeros)
    assert (np.diff(np.sort(recorder.routing, axis=-1), axis=-1) > 0).all()
    assert (counts.prompt_tokens, counts.generated_tokens, counts.uncaptured) == (prompt_tokens, 999, 0)
    assert counts.total.sum() == (prompt_tokens + 999) * 30 * 8
    assert on >= (1 - COST) * off
