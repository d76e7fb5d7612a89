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


# google/gemma-4-26B-A4B-it-assistant (transformers' Gemma 4 conversion script): 4 layers that attend over
# the target's KV cache (so the target's head layout), 0.4 B parameters with the 262144 x 1024 embedding.
ASSISTANT_TEXT_CONFIG = {
    "model_type": "gemma4_text",
    "hidden_size": 1024,
    "intermediate_size": 8192,
    "num_hidden_layers": 4,
    "num_kv_shared_layers": 4,
    "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_global_key_value_heads": 2,
    "head_dim": 256,
    "global_head_dim": 512,
    "attention_k_eq_v": True,
    "sliding_window": 1024,
    "vocab_size": 262144,
    "vocab_size_per_layer_input": 0,
    "hidden_size_per_layer_input": 0,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "rope_parameters": TEXT_CONFIG["rope_parameters"],
}


def write_assistant_checkpoint(out: Path, *, target: Path) -> Path:
    """The MTP drafter of the full-size model written by `write_full_size_checkpoint(target)`, without weights."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.loads((target / "config.json").read_text())["text_config"]
    config = {
        "architectures": ["Gemma4AssistantForCausalLM"],
        "model_type": "gemma4_assistant",
        "backbone_hidden_size": text["hidden_size"],
        "use_ordered_embeddings": False,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
        "text_config": {
            **ASSISTANT_TEXT_CONFIG,
            **{k: text[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id") if k in text},
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
