"""patches.warmup against vLLM 0.26's real router GEMM warm-up (no GPU: the kernel compiler is recorded, not run)."""

from __future__ import annotations

import json

import pytest
from vllm.model_executor.kernels.linear.cute_dsl import ll_bf16
from vllm.model_executor.warmup import kernel_warmup

import patches.warmup
from bench.checkpoints import write_full_size_checkpoint
from engine import model_source

GEMMA4_26B_ROUTER = (2816, 128)  # (hidden size, experts)


@pytest.fixture
def compiled(monkeypatch):
    """The compile keys vLLM's warm-up asks for, as if CUTLASS's Python DSL were installed."""
    keys = []
    monkeypatch.setattr(kernel_warmup, "_LL_BF16_WARMUP_MODEL_SHAPES", kernel_warmup._LL_BF16_WARMUP_MODEL_SHAPES)
    monkeypatch.setattr(ll_bf16, "is_available", lambda: True)
    monkeypatch.setattr(ll_bf16.ll_bf16_gemm_kernel, "compile", keys.append)
    return keys


def test_vllm_026_warms_up_other_models_routers_only(compiled):
    kernel_warmup._warmup_ll_bf16_router_gemm()
    assert len(compiled) == 17  # ~16 s of every engine start on an H200
    assert GEMMA4_26B_ROUTER[0] not in {key.K for key in compiled}


def test_with_the_patch_it_warms_up_gemma_4s_router(compiled):
    assert patches.warmup.install(GEMMA4_26B_ROUTER) == patches.warmup.NOTE
    kernel_warmup._warmup_ll_bf16_router_gemm()
    dot_products = [key for key in compiled if key.backend == "dotprod"]
    assert [key.M for key in dot_products] == [1, 2, 3, 4] and {key.K for key in dot_products} == {2816}
    assert len(compiled) == 5  # and one split-K kernel for 5 to 16 tokens


def test_a_model_without_experts_warms_up_nothing(compiled):
    patches.warmup.install(None)
    kernel_warmup._warmup_ll_bf16_router_gemm()
    assert compiled == []


def test_the_router_shape_comes_from_the_checkpoint(tmp_path, tiny_vision_model_dir):
    full = write_full_size_checkpoint(tmp_path / "full", tokenizer_from=tiny_vision_model_dir, nvfp4=True)
    assert model_source.resolve(str(full), weights=False).router_shape == GEMMA4_26B_ROUTER
    assert model_source.inspect(tiny_vision_model_dir).router_shape == (256, 8)
    config = json.loads((full / "config.json").read_text())
    config["text_config"]["enable_moe_block"] = False  # a dense Gemma 4: no router
    (full / "config.json").write_text(json.dumps(config))
    assert model_source.inspect(full, weights=False).router_shape is None
