"""Gemma 4's MTP drafter must read the target model's embedding (vLLM issue 47794).

vLLM 0.26's `SpecDecodeBaseProposer._maybe_share_embeddings` keeps a draft's own embedding when its width
differs from the target's, a guard meant for EAGLE drafts that ship their own (vLLM PR 43957). Gemma 4's
assistant is built for the target's width (its pre_projection takes the target's embedding and hidden
state: 2 x 2816 for 26B-A4B) but carries a 1024-wide embedding that serves as its LM head, so the guard
leaves it with the wrong one and the engine fails to start ("a and b must have same reduction dim, but got
[s, 3840] X [5632, 1024]"). Upstream's fix (vLLM PR 47833) exempts MTP drafts; `install` wraps the method to
do the same where the installed vLLM has the guard, and the wrapper changes nothing where vLLM shared.
"""

from __future__ import annotations

import inspect
import logging

log = logging.getLogger("patches")
WIDTH_GUARD = "target_dim != draft_dim"  # the guard's test in vLLM's source
NOTE = "MTP drafter reads the model's embedding (vLLM issue 47794)"


def install() -> str | None:
    """Wrap vLLM's embedding sharing for MTP drafts; a line saying so, or None where nothing needs fixing."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    original = SpecDecodeBaseProposer._maybe_share_embeddings
    if getattr(original, "shares_mtp_embeddings", False):
        return NOTE
    if WIDTH_GUARD not in inspect.getsource(original):
        return None  # a vLLM without the guard shares the embedding with MTP drafts itself

    def maybe_share_embeddings(self, target_language_model) -> None:
        original(self, target_language_model)
        if hasattr(self.model, "has_own_embed_tokens"):
            return  # an EAGLE draft: vLLM's choice stands
        inner = getattr(target_language_model, "model", None)
        target = getattr(inner, "embed_tokens", None) or getattr(inner, "embedding", None)
        draft = self.model.model
        if target is not None and draft.embed_tokens is not target:
            log.info("MTP draft: using the target model's embedding (vLLM issue 47794)")
            del draft.embed_tokens
            draft.embed_tokens = target

    maybe_share_embeddings.shares_mtp_embeddings = True
    SpecDecodeBaseProposer._maybe_share_embeddings = maybe_share_embeddings
    return NOTE
