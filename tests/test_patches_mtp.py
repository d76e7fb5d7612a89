"""patches.mtp against vLLM 0.26's real embedding sharing for speculative drafts (vLLM issue 47794)."""

from __future__ import annotations

import types

import pytest
from torch import nn
from vllm.v1.spec_decode import llm_base_proposer
from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

import patches.mtp


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(
        SpecDecodeBaseProposer, "_maybe_share_embeddings", SpecDecodeBaseProposer._maybe_share_embeddings
    )
    monkeypatch.setattr(llm_base_proposer, "get_pp_group", lambda: types.SimpleNamespace(world_size=1))
    return patches.mtp.install()


def proposer(draft_width: int, *, eagle: bool = False):
    """A stand-in proposer holding a draft whose embedding is `draft_width` wide (Gemma 4's assistant: 1024)."""
    draft = types.SimpleNamespace(model=nn.Module(), lm_head=nn.Linear(draft_width, 8))
    draft.model.embed_tokens = nn.Embedding(8, draft_width)
    if eagle:
        draft.has_own_embed_tokens = True
    return types.SimpleNamespace(model=draft)


def target(width: int = 2816) -> nn.Module:
    model = nn.Module()
    model.model = nn.Module()
    model.model.embed_tokens = nn.Embedding(8, width)
    return model


def test_vllm_026_keeps_an_mtp_drafts_narrower_embedding_without_the_patch(monkeypatch):
    monkeypatch.setattr(llm_base_proposer, "get_pp_group", lambda: types.SimpleNamespace(world_size=1))
    p, t = proposer(1024), target()
    SpecDecodeBaseProposer._maybe_share_embeddings(p, t)
    assert p.model.model.embed_tokens is not t.model.embed_tokens  # the bug: the assistant's 1024-wide one


def test_with_the_patch_an_mtp_draft_reads_the_targets_embedding(patched):
    assert patched and "47794" in patched
    p, t = proposer(1024), target()
    SpecDecodeBaseProposer._maybe_share_embeddings(p, t)
    assert p.model.model.embed_tokens is t.model.embed_tokens
    assert p.model.lm_head.in_features == 1024  # the assistant keeps its own LM head


def test_an_eagle_draft_with_its_own_embedding_keeps_it(patched):
    p, t = proposer(1024, eagle=True), target()
    SpecDecodeBaseProposer._maybe_share_embeddings(p, t)
    assert p.model.model.embed_tokens is not t.model.embed_tokens


def test_installing_twice_wraps_once(patched):
    wrapped = SpecDecodeBaseProposer._maybe_share_embeddings
    assert patches.mtp.install() == patched
    assert SpecDecodeBaseProposer._maybe_share_embeddings is wrapped
