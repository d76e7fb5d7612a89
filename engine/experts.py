"""✦ Experts at work: how often each expert of each layer was routed to for one reply, and a summary of it.

Routing comes as rows of expert ids, one row per token that went through the model, shaped [tokens, layers, top_k]
(vLLM's routed-experts layout; the transformers backend stacks its routers' top-k ids the same way). Rows come in
token order: first the prompt's (a text prompt's last PROMPT_TOKENS at most; vLLM can cut a prompt with images only
once it has expanded them, so those come whole), then one per reply token fed back through the model. A reply of n
tokens therefore has n - 1 routed rows: its last token is sampled but never fed back.

    counts = ExpertCounts.empty(layers=30, experts=128, top_k=8, prompt_size=412)
    counts = counts.add(rows)          # a new value; the old one is unchanged (Deltas keep theirs)
    counts.generated[layer, expert]    # routings of reply tokens; counts.prompt the prompt's
    counts.summary()                   # most used experts overall and per layer, how spread each layer's routing is

A (token, layer) row whose ids are all 0 carries no routing: vLLM zeroes its capture buffer every step, so a layer
whose MoE kernel routes inside itself (FlashInfer TRT-LLM's monolithic kernels) leaves zeros, while a real top-k row
holds top_k distinct experts. Such rows are counted in `uncaptured` and left out of the counts, so a capture that
fails shows as missing rather than as expert 0 being busy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

# Prompt tokens whose routing is counted: the last this many (a new message and some context). Bounds the one-off cost
# of a long conversation's prompt (vLLM gathers, sends and we count 240 bytes per token for 30 layers x top-8).
PROMPT_TOKENS = 4096


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class ExpertCounts:
    """Routing counts for one reply: prompt and generated tokens apart, each [layers, experts]. Immutable."""

    prompt: np.ndarray  # int64 [layers, experts]: routings of the prompt's tokens
    generated: np.ndarray  # int64 [layers, experts]: routings of the reply's tokens
    top_k: int
    prompt_size: int = 0  # routed prompt rows this reply will have (the first rows fed are the prompt's)
    prompt_tokens: int = 0  # prompt rows counted so far
    generated_tokens: int = 0  # reply rows counted so far
    uncaptured: int = 0  # (token, layer) rows that carried no routing, left out
    _offsets: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @classmethod
    def empty(cls, layers: int, experts: int, top_k: int, prompt_size: int = 0) -> ExpertCounts:
        zeros = _frozen(np.zeros((layers, experts), dtype=np.int64))
        return cls(zeros, zeros, top_k, prompt_size=prompt_size)

    def __post_init__(self):
        if self._offsets is None:
            offsets = (np.arange(self.layers, dtype=np.intp) * self.experts)[None, :, None]
            object.__setattr__(self, "_offsets", offsets)

    @property
    def layers(self) -> int:
        return self.prompt.shape[0]

    @property
    def experts(self) -> int:
        return self.prompt.shape[1]

    @property
    def total(self) -> np.ndarray:
        return self.prompt + self.generated

    def add(self, routing: np.ndarray) -> ExpertCounts:
        """These counts plus rows of routing ids [tokens, layers, top_k], the next rows in token order."""
        rows = np.asarray(routing)
        if rows.size == 0:
            return self
        if rows.ndim != 3 or rows.shape[1:] != (self.layers, self.top_k):
            raise ValueError(f"expected routing of shape [tokens, {self.layers}, {self.top_k}], got {rows.shape}")
        into_prompt = min(len(rows), max(self.prompt_size - self.prompt_tokens, 0))
        prompt, uncaptured_p = self._count(rows[:into_prompt], self.prompt)
        generated, uncaptured_g = self._count(rows[into_prompt:], self.generated)
        return replace(
            self,
            prompt=prompt,
            generated=generated,
            prompt_tokens=self.prompt_tokens + into_prompt,
            generated_tokens=self.generated_tokens + len(rows) - into_prompt,
            uncaptured=self.uncaptured + uncaptured_p + uncaptured_g,
        )

    def _count(self, rows: np.ndarray, into: np.ndarray) -> tuple[np.ndarray, int]:
        if len(rows) == 0:
            return into, 0  # unchanged: shared with the previous value (both are read-only)
        flat = rows.astype(np.intp) + self._offsets  # layer * experts + expert
        missing = 0
        if self.top_k > 1:
            blank = ~rows.any(axis=-1)  # [tokens, layers]: all ids 0, no routing was captured there
            missing = int(blank.sum())
            if missing:
                flat = flat[~blank]
        counted = np.bincount(flat.ravel(), minlength=self.layers * self.experts)
        return _frozen(into + counted.reshape(self.layers, self.experts)), missing

    def summary(self, part: str = "generated", top: int = 8) -> ExpertSummary:
        """Most used experts and how spread the routing is, for the reply ("generated"), the prompt or "all"."""
        counts = {"generated": self.generated, "prompt": self.prompt, "all": self.total}[part]
        tokens = {
            "generated": self.generated_tokens,
            "prompt": self.prompt_tokens,
            "all": self.prompt_tokens + self.generated_tokens,
        }[part]
        return ExpertSummary.of(counts, tokens, self.top_k, top)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertCounts):
            return NotImplemented
        return (
            (self.top_k, self.prompt_size, self.prompt_tokens, self.generated_tokens, self.uncaptured)
            == (other.top_k, other.prompt_size, other.prompt_tokens, other.generated_tokens, other.uncaptured)
            and np.array_equal(self.prompt, other.prompt)
            and np.array_equal(self.generated, other.generated)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"ExpertCounts({self.layers} layers x {self.experts} experts, top {self.top_k}; prompt "
            f"{self.prompt_tokens}/{self.prompt_size} tokens, generated {self.generated_tokens}, "
            f"uncaptured {self.uncaptured})"
        )


@dataclass(frozen=True)
class ExpertSummary:
    """One reply's routing at a glance. A share is the fraction of the tokens that an expert served (each token goes
    to top_k experts of every layer, so a layer's shares add up to top_k; uniform routing gives top_k / experts)."""

    tokens: int
    top: tuple[tuple[int, int, float], ...]  # (layer, expert, share), the most used (layer, expert) pairs first
    per_layer: tuple[tuple[tuple[int, float], ...], ...]  # per layer: (expert, share), most used first
    spread: tuple[float | None, ...]  # per layer: normalized entropy, 1.0 = uniform over experts; None: no tokens
    mean_spread: float | None  # over the layers that have tokens
    experts_used: tuple[int, ...]  # per layer: experts routed to at least once

    @classmethod
    def of(cls, counts: np.ndarray, tokens: int, top_k: int, top: int = 8) -> ExpertSummary:
        layers, experts = counts.shape
        per_token = counts / tokens if tokens else np.zeros(counts.shape)
        order = np.argsort(-counts, axis=None, kind="stable")[:top]
        best = tuple(
            (int(layer), int(expert), float(per_token[layer, expert]))
            for layer, expert in zip(*np.unravel_index(order, counts.shape), strict=True)
            if counts[layer, expert] > 0
        )
        per_layer = tuple(
            tuple(
                (int(e), float(per_token[layer, e]))
                for e in np.argsort(-counts[layer], kind="stable")[:top]
                if counts[layer, e] > 0
            )
            for layer in range(layers)
        )
        spread = tuple(normalized_entropy(row) for row in counts)
        known = [s for s in spread if s is not None]
        return cls(
            tokens=tokens,
            top=best,
            per_layer=per_layer,
            spread=spread,
            mean_spread=sum(known) / len(known) if known else None,
            experts_used=tuple(int(n) for n in (counts > 0).sum(axis=1)),
        )


def normalized_entropy(counts: np.ndarray) -> float | None:
    """Entropy of the distribution `counts` over its bins divided by log(bins): 1.0 uniform, 0.0 one bin; None when
    empty. One token routed to k of E experts gives log(k) / log(E)."""
    total = counts.sum()
    if total == 0 or len(counts) < 2:
        return None
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(counts)))
