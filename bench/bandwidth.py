"""The memory-bandwidth limit of decoding: bytes read per generated token, from the checkpoint's config.

One decode step reads every weight that the step's tokens touch, plus their KV cache. At one stream that
is the dense layers, the 8 routed experts of each layer and the whole (tied) lm_head; the embedding
lookup reads one row. The limit is then `peak bandwidth / bytes per token`. Nothing here is measured:
the only hard-coded numbers are the GPUs' peak memory bandwidths, from NVIDIA's datasheets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Peak HBM bandwidth in TB/s (10^12 bytes/s), from NVIDIA's product datasheets ("GPU memory bandwidth").
# Matched against the NVML device name in order, first hit wins: more specific names first.
PEAK_BANDWIDTH_TB_S: list[tuple[str, float]] = [
    ("GH200", 4.0),  # Grace Hopper superchip, 96 GB HBM3 (the 144 GB HBM3e one: 4.9)
    ("H200", 4.8),  # H200 SXM 141 GB HBM3e (H200 NVL: 4.8 too)
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),  # H100 SXM5 80 GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("H800", 3.35),
    ("H20", 4.0),
    ("B200", 8.0),
    ("GB200", 8.0),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),  # 40 GB
    ("L40S", 0.864),
    ("RTX 5090", 1.792),
    ("RTX 4090", 1.008),
    ("GB10", 0.273),  # DGX Spark, LPDDR5x
]
PEAK_BANDWIDTH_SOURCE = "NVIDIA datasheets (peak HBM bandwidth): H100 SXM 3.35 TB/s, H200 4.8 TB/s"

NVFP4_BITS = 4 + 8 / 16  # E2M1 values + one FP8 (E4M3) scale per 16 values; the per-tensor FP32 scale is noise
BF16_BITS = 16
KV_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "auto": 2, "bfloat16": 2, "float16": 2}


def peak_bandwidth_tb_s(gpu_name: str) -> float | None:
    for key, tb_s in PEAK_BANDWIDTH_TB_S:
        if key.lower() in gpu_name.lower():
            return tb_s
    return None


@dataclass(frozen=True)
class ActiveParams:
    """Parameters one token reads, by storage class (counts, not bytes)."""

    quantizable: int  # attention projections, dense MLP, the routed experts a token uses
    experts_per_token: int  # the part of `quantizable` that is routed experts (for batch > 1)
    bf16: int  # kept in BF16 by the NVFP4 checkpoint: lm_head, routers
    expert_params: int  # one expert's parameters in one layer
    num_experts: int
    top_k: int
    num_layers: int


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def active_params(config: dict[str, Any]) -> ActiveParams:
    """Gemma 4 (26B-A4B layout): per layer attention + a dense MLP + top-k of the routed experts."""
    c = text_config(config)
    hidden = c["hidden_size"]
    layers = c["num_hidden_layers"]
    layer_types = c.get("layer_types") or ["sliding_attention"] * layers
    heads = c["num_attention_heads"]
    k_eq_v = bool(c.get("attention_k_eq_v"))
    quantizable = 0
    for kind in layer_types:
        if kind == "full_attention":
            head_dim = c.get("global_head_dim") or c["head_dim"]
            kv_heads = c.get("num_global_key_value_heads") or c["num_key_value_heads"]
            v_proj = 0 if k_eq_v else 1  # full-attention layers of 26B-A4B use K as V: no v_proj
        else:
            head_dim, kv_heads, v_proj = c["head_dim"], c["num_key_value_heads"], 1
        q_o = 2 * hidden * heads * head_dim
        k_v = (1 + v_proj) * hidden * kv_heads * head_dim
        quantizable += q_o + k_v
    dense_mlp = 3 * hidden * c["intermediate_size"] if c.get("intermediate_size") else 0
    quantizable += layers * dense_mlp
    experts = c.get("num_experts") or 0
    top_k = c.get("top_k_experts") or 0
    expert = 3 * hidden * (c.get("moe_intermediate_size") or 0)  # gate, up, down
    routed = layers * top_k * expert if c.get("enable_moe_block", experts > 0) else 0
    quantizable += routed
    router = layers * hidden * experts
    lm_head = c["vocab_size"] * hidden  # tied to the embedding, read whole every step
    return ActiveParams(
        quantizable=quantizable,
        experts_per_token=routed,
        bf16=lm_head + router,
        expert_params=expert,
        num_experts=experts,
        top_k=top_k,
        num_layers=layers,
    )


def expected_unique_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Experts a layer reads for `batch` tokens routed uniformly at random (dummy weights route ~uniformly)."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def kv_bytes_per_token(config: dict[str, Any], context: int, kv_cache_dtype: str = "fp8") -> float:
    """KV cache one sequence reads for one new token at `context` tokens (sliding layers cap at the window)."""
    c = text_config(config)
    per = KV_BYTES.get(kv_cache_dtype, 2)
    window = c.get("sliding_window") or context
    total = 0.0
    for kind in c.get("layer_types") or ["sliding_attention"] * c["num_hidden_layers"]:
        if kind == "full_attention":
            head_dim = c.get("global_head_dim") or c["head_dim"]
            kv_heads = c.get("num_global_key_value_heads") or c["num_key_value_heads"]
            tensors = 1 if c.get("attention_k_eq_v") else 2
            total += context * kv_heads * head_dim * tensors * per
        else:
            total += min(context, window) * c["num_key_value_heads"] * c["head_dim"] * 2 * per
    return total


def bytes_per_step(
    config: dict[str, Any], *, nvfp4: bool, batch: int = 1, context: int = 0, kv_cache_dtype: str = "fp8"
) -> float:
    """Bytes one decode step of `batch` sequences reads (weights once, experts as routed, each one's KV)."""
    p = active_params(config)
    bits = NVFP4_BITS if nvfp4 else BF16_BITS
    shared = p.quantizable - p.experts_per_token
    experts = p.num_layers * expected_unique_experts(p.num_experts, p.top_k, batch) * p.expert_params
    weights = (shared + experts) * bits / 8 + p.bf16 * 2
    return weights + batch * kv_bytes_per_token(config, context, kv_cache_dtype)


@dataclass(frozen=True)
class BandwidthLimit:
    gpu_name: str
    peak_tb_s: float | None
    source: str
    nvfp4_bytes_per_token: float  # weights only, one stream
    bf16_bytes_per_token: float
    nvfp4_limit_tok_s_bs1: float | None
    bf16_limit_tok_s_bs1: float | None
    active_params_quantized: int
    active_params_bf16: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def limit(config: dict[str, Any], gpu_name: str, peak_tb_s: float | None = None) -> BandwidthLimit:
    source = "--peak-bandwidth-tbs" if peak_tb_s else PEAK_BANDWIDTH_SOURCE
    peak = peak_tb_s or peak_bandwidth_tb_s(gpu_name)
    nv, bf = bytes_per_step(config, nvfp4=True), bytes_per_step(config, nvfp4=False)
    p = active_params(config)
    return BandwidthLimit(
        gpu_name=gpu_name,
        peak_tb_s=peak,
        source=source,
        nvfp4_bytes_per_token=nv,
        bf16_bytes_per_token=bf,
        nvfp4_limit_tok_s_bs1=None if peak is None else peak * 1e12 / nv,
        bf16_limit_tok_s_bs1=None if peak is None else peak * 1e12 / bf,
        active_params_quantized=p.quantizable,
        active_params_bf16=p.bf16,
    )


def fraction_of_peak(
    config: dict[str, Any],
    *,
    nvfp4: bool,
    aggregate_tok_s: float | None,
    batch: int,
    context: int,
    peak_tb_s: float | None,
    kv_cache_dtype: str = "fp8",
) -> float | None:
    """Achieved bytes/s over peak: `batch` streams at `aggregate_tok_s` together, each at `context` tokens."""
    if not aggregate_tok_s or not peak_tb_s or batch < 1:
        return None
    steps_per_s = aggregate_tok_s / batch
    step = bytes_per_step(config, nvfp4=nvfp4, batch=batch, context=context, kv_cache_dtype=kv_cache_dtype)
    return steps_per_s * step / (peak_tb_s * 1e12)


def load_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())
