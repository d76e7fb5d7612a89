"""The workload every arm runs, the prompts it sends, and the arithmetic on what comes back.

Nothing here needs a GPU or vLLM: the driver builds the prompts once (so every arm sends the same ones)
and the workers only replay them.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Plain English words: every tokenizer (the real Gemma 4 one, the tiny test one) splits them into few tokens.
WORDS = (
    "the a and of to in is it that for on with as was at by be this from or have an they which one you "
    "were all we when there can more if no out so what up said about other into than its time only new "
    "some could these two may first then do any like my now over such our man me even most made after "
    "also did many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three small place house number river city light water sound green "
    "table garden music window letter winter summer engine paper stone bridge market forest planet signal "
    "simple careful quiet bright distant ancient modern gentle narrow heavy rapid silver golden hidden"
).split()

TOLERANCE = 0.02  # text prompts land within 2 % of the target token count through tokenizer + chat template
HEADLINE_PROMPT = 512  # the reference runs: 512-token prompt, 1000 tokens out, one stream


# --------------------------------------------------------------------------------------------- matrix


@dataclass(frozen=True)
class Run:
    """One measured point: `streams` requests of `prompt_len` tokens in, `output_len` out, sent together."""

    prompt_len: int
    output_len: int
    streams: int
    repeat: int = 0

    @property
    def key(self) -> str:
        return f"p{self.prompt_len}-o{self.output_len}-c{self.streams}-r{self.repeat}"


@dataclass(frozen=True)
class Workload:
    prompt_lens: tuple[int, ...] = (128, 512, 2048, 8192)
    output_lens: tuple[int, ...] = (256, 1000)
    concurrency: tuple[int, ...] = (1, 4)
    # Outputs longer than the shortest run only at this prompt length (None: at every length).
    long_output_prompt_len: int | None = HEADLINE_PROMPT
    ttft_samples: int = 5  # extra one-stream requests per prompt length, `ttft_output_len` tokens each
    ttft_output_len: int = 8
    repeats: int = 1
    warmup_output_len: int = 8

    def runs(self) -> list[Run]:
        """Measured runs, the headline ones (one stream, longest output at the headline prompt) first."""
        shortest = min(self.output_lens)
        runs = []
        for r in range(self.repeats):
            for p in self.prompt_lens:
                for o in sorted(self.output_lens):
                    if o != shortest and self.long_output_prompt_len is not None and p != self.long_output_prompt_len:
                        continue
                    for c in sorted(self.concurrency):
                        runs.append(Run(p, o, c, r))
        head = headline_prompt_len(self.prompt_lens)
        longest = max(self.output_lens)
        return sorted(runs, key=lambda run: (run.repeat, (run.prompt_len, run.output_len) != (head, longest)))

    def long_output_lens(self) -> list[int]:
        return sorted(o for o in self.output_lens if o != min(self.output_lens))

    def max_len_needed(self) -> int:
        return max(self.prompt_lens) + max(self.output_lens) + 64

    def warmups(self) -> list[tuple[int, int]]:
        """(prompt length, streams) sent before measuring: every shape the runs use, so that Triton's JIT
        compiles its kernels for them here (vLLM warns "Triton kernel JIT compilation during inference"
        otherwise: on an H200 a first 4 x 512-token prefill took 0.7-1.7 s instead of 30 ms)."""
        return [(p, c) for p in self.prompt_lens for c in sorted(self.concurrency)]

    def prompt_requests(self) -> dict[int, int]:
        """Distinct prompts needed per prompt length (each request gets its own: no prefix-cache hits)."""
        need: dict[int, int] = {p: 0 for p in self.prompt_lens}
        for p, streams in self.warmups():
            need[p] += streams
        for p in self.prompt_lens:
            need[p] += self.ttft_samples
        for run in self.runs():
            need[run.prompt_len] += run.streams
        return need

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def headline_prompt_len(prompt_lens: Sequence[int]) -> int:
    return min(prompt_lens, key=lambda p: (abs(p - HEADLINE_PROMPT), p))


def parse_int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


# -------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One request's prompt: chat text for the Engine and the app, exact token ids for raw vLLM."""

    target: int
    index: int
    text: str  # the user message
    text_tokens: int  # its length through the chat template and tokenizer
    token_ids: list[int] = field(repr=False)  # exactly `target` ids: the same chat, trimmed to length


class PromptSet:
    """Prompts per target length, handed out in order: every arm replays the same sequence of requests."""

    def __init__(self, prompts: dict[int, list[Prompt]]):
        self.prompts = prompts
        self._next = {p: 0 for p in prompts}

    def take(self, target: int) -> Prompt:
        i = self._next[target]
        self._next[target] = i + 1
        pool = self.prompts[target]
        if i >= len(pool):
            raise IndexError(f"only {len(pool)} prompts of {target} tokens were built")
        return pool[i]

    def save(self, path: Path) -> None:
        data = {str(k): [asdict(p) for p in v] for k, v in self.prompts.items()}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> PromptSet:
        data = json.loads(Path(path).read_text())
        return cls({int(k): [Prompt(**p) for p in v] for k, v in data.items()})


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _render(tokenizer: Any, user_text: str) -> str:
    messages = [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)


def _count(tokenizer: Any, rendered: str) -> int:
    # The template writes <bos> itself: tokenize without adding special tokens, as a chat server does.
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer: Any, target: int, index: int, seed: int = 0) -> Prompt:
    """A user message of random words whose chat-templated length is within TOLERANCE of `target` tokens.

    The first words differ between indices, so no two requests share a cached prefix. `token_ids` is the
    templated chat with the message's tokens cut (or repeated) to make exactly `target` tokens.
    """
    rng = random.Random(f"{seed}:{target}:{index}")
    marker = "\u2063BENCH\u2063"
    head, tail = _render(tokenizer, marker).split(marker)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    budget = max(target - len(head_ids) - len(tail_ids), 1)

    words = [f"Request {index}:"] + _words(rng, max(budget * 2, 8))
    # Largest word count whose templated length stays <= target, then the closer of it and one more word.
    lo, hi = 1, len(words)
    while _count(tokenizer, _render(tokenizer, " ".join(words[:hi]))) < target:
        words += _words(rng, len(words))
        hi = len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(tokenizer, _render(tokenizer, " ".join(words[:mid]))) <= target:
            lo = mid
        else:
            hi = mid - 1
    best = min(
        (lo, lo + 1),
        key=lambda n: abs(_count(tokenizer, _render(tokenizer, " ".join(words[:n]))) - target),
    )
    text = " ".join(words[:best])
    text_tokens = _count(tokenizer, _render(tokenizer, text))

    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(body) < budget:
        body = body + body
    token_ids = list(head_ids) + list(body[:budget]) + list(tail_ids)
    token_ids = token_ids[:target] if len(token_ids) > target else token_ids
    return Prompt(target=target, index=index, text=text, text_tokens=text_tokens, token_ids=token_ids)


def build_prompts(tokenizer: Any, counts: dict[int, int], seed: int = 0) -> PromptSet:
    return PromptSet(
        {target: [build_prompt(tokenizer, target, i, seed) for i in range(n)] for target, n in sorted(counts.items())}
    )


# ----------------------------------------------------------------------------------- measurements


@dataclass
class RequestResult:
    """What one streamed request did, timed by the client (perf_counter seconds) and, where known, by vLLM."""

    prompt_tokens: int | None
    output_tokens: int
    submitted: float
    first: float | None  # first chunk carrying tokens arrived
    last: float | None  # last chunk carrying tokens arrived
    first_chunk_tokens: int = 1
    chunks: int = 0
    engine_ttft_s: float | None = None  # vLLM's own first_token_latency (or the app's displayed TTFT)
    engine_decode_tok_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    timing: str = "client"  # where arrival times come from (the app arm: "sse-arrival" or "job-iteration")

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.submitted

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first chunk over the time since it (= engine.metrics' (n-1)/(last-first))."""
        return decode_rate(self.output_tokens - self.first_chunk_tokens + 1, self.first, self.last)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ttft_s"], d["decode_tok_s"] = self.ttft_s, self.decode_tok_s
        return d


def decode_rate(tokens: int, first: float | None, last: float | None) -> float | None:
    if first is None or last is None or tokens < 2 or last <= first:
        return None
    return (tokens - 1) / (last - first)


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def summarize_run(run: Run, results: list[RequestResult]) -> dict[str, Any]:
    """One run's numbers: TTFT spread, per-stream decode speed, aggregate throughput."""
    ok = [r for r in results if r.error is None and r.first is not None]
    total_tokens = sum(r.output_tokens for r in ok)
    start = min((r.submitted for r in results), default=None)
    end = max((r.last for r in ok if r.last is not None), default=None)
    wall = None if start is None or end is None else end - start
    first_all = max((r.first for r in ok), default=None)
    # Steady state with every stream decoding: tokens after each stream's first, between the last first
    # token and the first finish (a cleaner "4 streams together" number than the wall-clock aggregate).
    return {
        **asdict(run),
        "key": run.key,
        "requests": len(results),
        "errors": [r.error for r in results if r.error],
        "prompt_tokens": [r.prompt_tokens for r in results],
        "output_tokens": [r.output_tokens for r in results],
        "short_outputs": sum(1 for r in ok if r.output_tokens < run.output_len),
        "ttft_ms": [None if r.ttft_s is None else r.ttft_s * 1000 for r in results],
        "engine_ttft_ms": [None if r.engine_ttft_s is None else r.engine_ttft_s * 1000 for r in results],
        "decode_tok_s": [r.decode_tok_s for r in results],
        "decode_tok_s_mean": mean(r.decode_tok_s for r in ok),
        "engine_decode_tok_s": [r.engine_decode_tok_s for r in results],
        "aggregate_tok_s": total_tokens / wall if wall else None,
        "wall_s": wall,
        "all_streaming_from_s": None if first_all is None or start is None else first_all - start,
        "overlapped": _overlapped(ok),
        "chunks": [r.chunks for r in results],
        "finish_reasons": [r.finish_reason for r in results],
        "timing": sorted({r.timing for r in results}),
        "requests_detail": [r.to_dict() for r in results],
    }


def _overlapped(results: list[RequestResult]) -> bool | None:
    """Whether concurrent requests really ran together (a queue with concurrency 1 would serialize them)."""
    if len(results) < 2:
        return None
    latest_first = max(r.first for r in results if r.first is not None)
    earliest_last = min(r.last for r in results if r.last is not None)
    return latest_first < earliest_last
