"""vLLM accepts the tiny checkpoints on a CPU-only machine: the model config resolves to Gemma 4 (this is what
breaks when transformers outruns vLLM: 5.15+ raises AmbiguousGlobalPerLayerAttributeError here) and vLLM's
multimodal processor expands images and videos as transformers does. No env var or device setting is needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from vllm.engine.arg_utils import EngineArgs
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.context import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs

from tests.tiny_model import TOKEN_ID

ARCH = "Gemma4ForConditionalGeneration"


def test_text_model_config(tiny_model_dir: Path) -> None:
    config = EngineArgs(model=str(tiny_model_dir)).create_model_config()
    assert config.architecture == ARCH
    assert config.max_model_len == 262144  # max_position_embeddings, as in the real checkpoint
    assert config.hf_config.text_config.num_experts == 8
    assert EngineArgs(model=str(tiny_model_dir), max_model_len=4096).create_model_config().max_model_len == 4096
    # Without processor files the text build is served text-only.
    text_only = EngineArgs(model=str(tiny_model_dir), language_model_only=True).create_model_config()
    assert text_only.multimodal_config.get_limit_per_prompt("image") == 0


def test_vision_model_config_and_processor(tiny_vision_model_dir: Path) -> None:
    config = EngineArgs(model=str(tiny_vision_model_dir), max_model_len=4096).create_model_config()
    assert config.architecture == ARCH
    assert config.max_model_len == 4096
    assert config.is_multimodal_model

    processor = MULTIMODAL_REGISTRY.create_processor(config)
    # Reads vision_config.default_output_length, which a checkpoint without it fails on.
    assert processor.info.get_mm_max_tokens_per_item(4096, {"image": 1, "video": 1})["image"] == 280

    def placeholders(prompt: str, mm_data: dict, token: str) -> int:
        items = processor.info.parse_mm_data(mm_data)
        out = processor.apply(ProcessorInputs(prompt, items), TimingContext(enabled=False))
        return out["prompt_token_ids"].count(TOKEN_ID[token])

    image = Image.fromarray(np.zeros((240, 320, 3), dtype=np.uint8))
    assert placeholders("<|turn>user\n<|image|>What?<turn|>\n", {"image": [image]}, "<|image|>") == 266
    frames = np.zeros((4, 96, 128, 3), dtype=np.uint8)
    # vLLM wants video metadata with the frames (video_needs_metadata); 63 soft tokens per 96x128 frame.
    metadata = {"fps": 2.0, "frames_indices": [0, 1, 2, 3], "total_num_frames": 4, "duration": 2.0,
                "do_sample_frames": False}  # fmt: skip
    video = {"video": [(frames, metadata)]}
    assert placeholders("<|turn>user\n<|video|>What?<turn|>\n", video, "<|video|>") == 4 * 63
