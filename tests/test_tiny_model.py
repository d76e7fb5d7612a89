"""The tiny Gemma 4 that the other tests run on: it generates in transformers, its chat template renders
like Gemma 4's, and its processor expands images and videos into soft tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Gemma4ForConditionalGeneration
from transformers.video_utils import VideoMetadata

from tests.tiny_model import SPECIAL_TOKENS, TOKEN_ID

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<|channel>thought\nA greeting.<channel|>Hello!"},
    {"role": "user", "content": "Why?"},
]
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"


def test_greedy_generation_is_deterministic(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = Gemma4ForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert model.dtype == torch.bfloat16
    assert model.config.text_config.num_experts == 8
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_len = inputs["input_ids"].shape[1]
    new = 12
    # min_new_tokens: a random model may pick <eos> or <turn|> early; the test wants exactly `new` tokens.
    runs = [model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False) for _ in range(2)]
    assert runs[0].shape == (1, prompt_len + new)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :prompt_len], inputs["input_ids"])


def test_chat_template_renders_turns_and_thinking_switch(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))

    off = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert off == (
        "<bos><|turn>system\nBe brief.<turn|>\n"
        "<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n"  # past reasoning is stripped
        "<|turn>user\nWhy?<turn|>\n"
        "<|turn>model\n" + EMPTY_THOUGHT
    )
    # Thinking on: <|think|> opens the system turn and the model opens its own thought channel.
    on = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == off.replace("<|turn>system\n", "<|turn>system\n<|think|>\n").removesuffix(EMPTY_THOUGHT)
    # Without a system message, thinking still gets a system turn of its own.
    user_only = [{"role": "user", "content": "Hi"}]
    thinking = tokenizer.apply_chat_template(
        user_only, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert thinking == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    assert tokenizer.apply_chat_template(user_only, tokenize=False) == "<bos><|turn>user\nHi<turn|>\n"

    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert ids[:2] == [TOKEN_ID["<bos>"], TOKEN_ID["<|turn>"]]  # one <bos>: the template's
    assert ids[-1] == TOKEN_ID["<channel|>"]
    assert tokenizer.decode(ids) == off


def test_processor_expands_an_image(tiny_vision_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_vision_model_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    soft_tokens = processor.image_processor(images=[image])["num_soft_tokens_per_image"][0]
    ids = inputs["input_ids"][0]
    assert 0 < soft_tokens <= 280
    assert (ids == TOKEN_ID["<|image|>"]).sum().item() == soft_tokens
    assert (ids == TOKEN_ID["<|image>"]).sum().item() == (ids == TOKEN_ID["<image|>"]).sum().item() == 1

    model = Gemma4ForConditionalGeneration.from_pretrained(tiny_vision_model_dir)
    out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[0] + 2)


def test_processor_expands_video_frames(tiny_vision_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_vision_model_dir)
    # Four frames sampled at 2 fps from a 2 s clip, as the app passes them after decoding with OpenCV.
    frames = np.random.default_rng(1).integers(0, 256, (4, 96, 128, 3), dtype=np.uint8)
    metadata = VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3], width=128, height=96)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|video|>" in text
    kwargs = {"video_metadata": [metadata], "do_sample_frames": False}  # the saved num_frames=32 would not fit
    inputs = processor(text=text, videos=[frames], add_special_tokens=False, return_tensors="pt", **kwargs)
    per_frame = processor.video_processor(videos=[frames], **kwargs)["num_soft_tokens_per_video"][0]
    ids = inputs["input_ids"][0]
    assert per_frame > 0
    assert (ids == TOKEN_ID["<|video|>"]).sum().item() == 4 * per_frame
    assert (ids == TOKEN_ID["<|image>"]).sum().item() == 4  # each frame wrapped in boi/eoi
    assert "00:00" in processor.decode(ids) and "00:01" in processor.decode(ids)  # mm:ss stamps

    model = Gemma4ForConditionalGeneration.from_pretrained(tiny_vision_model_dir)
    out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[0] + 2)
