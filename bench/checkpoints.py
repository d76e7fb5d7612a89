"""A full-size Gemma 4 26B-A4B checkpoint folder without weights, for vLLM's load_format="dummy".

The real weights can't be fetched here, but speed and memory depend only on the shapes: this writes
the model's published config (BF16 or the ModelOpt NVFP4 quantization config of the community
checkpoint) next to the tiny test tokenizer, whose ids all fall inside the real vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# google/gemma-4-26B-A4B-it's text model: 3.07 B quantized active parameters + a 0.74 B tied embedding.
TEXT_CONFIG = {
    "model_type": "gemma4_text",
    "hidden_size": 2816,
    "num_hidden_layers": 30,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_global_key_value_heads": 2,
    "head_dim": 256,
    "global_head_dim": 512,
    "intermediate_size": 2112,
    "moe_intermediate_size": 704,
    "num_experts": 128,
    "top_k_experts": 8,
    "enable_moe_block": True,
    "attention_k_eq_v": True,
    "sliding_window": 1024,
    "max_position_embeddings": 262144,
    "vocab_size": 262144,
    "vocab_size_per_layer_input": 262144,
    "hidden_size_per_layer_input": 0,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
}
VISION_CONFIG = {
    "model_type": "gemma4_vision",
    "num_hidden_layers": 27,
    "hidden_size": 1152,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 72,
    "intermediate_size": 4304,
    "patch_size": 16,
    "default_output_length": 280,
}
# What the community NVFP4 checkpoint keeps in BF16.
NVFP4_IGNORE = ["lm_head", "model.embed_vision*", "model.vision_tower*", "*router*"]
NVFP4_QUANT = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": NVFP4_IGNORE}


def write_full_size_checkpoint(out: Path, *, tokenizer_from: Path, nvfp4: bool) -> Path:
    """`tokenizer_from`: a tiny Gemma 4 vision checkpoint (tests.tiny_model) lending tokenizer and processor."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((tokenizer_from / "config.json").read_text())  # keeps the tiny special-token ids
    config["text_config"] = {**config["text_config"], **TEXT_CONFIG}
    if config.get("vision_config") is not None:
        config["vision_config"] = {**config["vision_config"], **VISION_CONFIG}
    config.pop("quantization_config", None)
    if nvfp4:
        config["quantization_config"] = NVFP4_QUANT
        (out / "hf_quant_config.json").write_text(
            json.dumps(
                {"producer": {"name": "modelopt"}, "quantization": {**NVFP4_QUANT, "exclude_modules": NVFP4_IGNORE}}
            )
        )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_from.iterdir():
        if f.suffix != ".safetensors" and f.name not in {"config.json", "model.safetensors.index.json"}:
            shutil.copy(f, out / f.name)
    return out
