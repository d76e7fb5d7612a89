"""TransformersEngine on the tiny Gemma 4, through the Engine protocol the UI uses."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.base import Delta, Engine, EngineError, GenerationRequest, SamplingOptions, Stage
from engine.reasoning import ReasoningSplitter
from engine.settings import EngineSettings
from engine.transformers_backend import TransformersEngine, _PresencePenalty, generate_kwargs, model_inputs
from media import VideoClip
from tests.tiny_model import TOKEN_ID

LONG = 100_000  # minutes of tokens on the endless model: a reply that only abort ends in time
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the engine puts the model


def copy_with_eos(checkpoint: Path, out: Path, eos_ids: list[int]) -> Path:
    """The checkpoint with other end-of-turn ids in its generation_config, the ids that end a reply."""
    shutil.copytree(checkpoint, out)
    config_path = out / "generation_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"eos_token_id": eos_ids}))
    return out


def endless_copy(checkpoint: Path, out: Path) -> Path:
    """Without end-of-turn ids only max_tokens or abort ends a reply (the random tiny model otherwise
    writes `<turn|>` within some tens of tokens)."""
    return copy_with_eos(checkpoint, out, [])


def started(checkpoint: Path) -> TransformersEngine:
    engine = TransformersEngine(EngineSettings(model=str(checkpoint), backend="transformers"))
    asyncio.run(engine.start())  # its own event loop, as the app starts the engine beside Gradio's
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = started(tiny_model_dir)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def endless(tiny_model_dir, tmp_path_factory):
    engine = started(endless_copy(tiny_model_dir, tmp_path_factory.mktemp("endless") / "tiny"))
    yield engine
    asyncio.run(engine.shutdown())


def chat(text: str, **sampling) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], SamplingOptions(**sampling))


async def reply(engine: Engine, request: GenerationRequest) -> tuple[str, str, list[Delta]]:
    deltas = [delta async for delta in engine.generate(request)]
    return "".join(d.reasoning for d in deltas), "".join(d.text for d in deltas), deltas


async def eventually(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    """Wait for what another thread or task will make true."""
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still not so after {timeout_s} s")


def test_start_loads_the_checkpoint(engine):
    assert isinstance(engine, Engine)
    assert engine.status().stage is Stage.READY
    assert engine.status().detail == f"bf16 on {DEVICE}"


class Reference:
    """Plain transformers generate() on the same checkpoint, to check the engine against."""

    def __init__(self, checkpoint: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).to(DEVICE)

    def prompt_ids(self, request: GenerationRequest) -> tuple[str, torch.Tensor]:
        prompt = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
        return prompt, self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(DEVICE)

    def greedy_ids(self, request: GenerationRequest) -> list[int]:
        _, prompt_ids = self.prompt_ids(request)
        out = self.model.generate(prompt_ids, do_sample=False, max_new_tokens=request.sampling.max_tokens)
        return out[0, prompt_ids.shape[1] :].tolist()

    def reasoning_and_text(self, request: GenerationRequest, ids: list[int]) -> tuple[str, str]:
        """Decoded in one go with the end-of-turn ids left out, then split."""
        prompt, _ = self.prompt_ids(request)
        eos = set(self.model.generation_config.eos_token_id)
        splitter = ReasoningSplitter(prompt)
        decoded = self.tokenizer.decode([i for i in ids if i not in eos], skip_special_tokens=False)
        reasoning, text = splitter.feed(decoded)
        tail_reasoning, tail_text = splitter.flush()
        return reasoning + tail_reasoning, text + tail_text


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> Reference:
    return Reference(tiny_model_dir)


async def test_a_greedy_reply_is_what_generate_gives_with_metrics_counted_in_tokens(engine, reference):
    request = chat("Tell me about the river.", temperature=0, max_tokens=48)
    reasoning, text, deltas = await reply(engine, request)

    ids = reference.greedy_ids(request)
    assert (reasoning, text) == reference.reasoning_and_text(request, ids)
    assert len(deltas) > 2 and all(d.finish_reason is None for d in deltas[:-1])
    eos = set(reference.model.generation_config.eos_token_id)
    assert deltas[-1].finish_reason == ("stop" if ids[-1] in eos else "length")
    metrics = deltas[-1].metrics
    assert metrics.output_tokens == len(ids)
    assert metrics.prompt_tokens == reference.prompt_ids(request)[1].shape[1]
    assert metrics.ttft_s > 0 and metrics.decode_tok_s > 0
    assert metrics.elapsed_s >= metrics.ttft_s
    assert [d.metrics.output_tokens for d in deltas] == sorted(d.metrics.output_tokens for d in deltas)


async def test_an_end_of_turn_id_ends_the_reply_with_stop_and_stays_out_of_it(reference, tiny_model_dir, tmp_path):
    request = chat("Tell me about the river.", temperature=0, max_tokens=48)
    ids = reference.greedy_ids(request)
    # Make the fourth new token of the greedy reply the checkpoint's end of turn.
    stop_at = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    engine = await asyncio.to_thread(started, copy_with_eos(tiny_model_dir, tmp_path / "tiny", [ids[stop_at]]))
    reasoning, text, deltas = await reply(engine, request)
    await engine.shutdown()

    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].metrics.output_tokens == stop_at + 1
    assert (reasoning, text) == reference.reasoning_and_text(request, ids[:stop_at])


async def test_max_tokens_ends_the_reply_with_length(endless):
    *_, deltas = await reply(endless, chat("Count to ten.", max_tokens=30))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].metrics.output_tokens == 30


async def test_the_same_seed_samples_the_same_reply(engine):
    first = await reply(engine, chat("Write a line.", seed=7, max_tokens=20))
    second = await reply(engine, chat("Write a line.", seed=7, max_tokens=20))
    assert first[:2] == second[:2]


async def test_abort_mid_reply_ends_it_with_abort_and_frees_the_engine(endless):
    request = chat("Talk forever.", max_tokens=LONG)
    deltas = []
    async for delta in endless.generate(request):
        deltas.append(delta)
        if len(deltas) == 3:
            await endless.abort(request.request_id)
    assert deltas[-1].finish_reason == "abort"
    assert deltas[-1].metrics.output_tokens < 100  # stopped within a few tokens of the abort
    await eventually(lambda: endless.stats().running == 0)

    *_, after = await reply(endless, chat("Hello again.", max_tokens=5))
    assert after[-1].finish_reason == "length"


async def test_closing_the_stream_early_aborts_the_generation(endless):
    stream = endless.generate(chat("Talk forever.", max_tokens=LONG))
    await anext(stream)
    assert endless.stats().running == 1
    await stream.aclose()  # what the UI does when the user presses stop
    await eventually(lambda: endless.stats().running == 0)

    *_, after = await reply(endless, chat("Hello again.", max_tokens=5))
    assert after[-1].finish_reason == "length"


async def test_requests_take_turns_and_a_waiting_one_can_be_aborted(endless):
    first = endless.generate(chat("Talk forever.", max_tokens=LONG))
    await anext(first)
    second = chat("Me next.", max_tokens=4)
    third = chat("Never mind.", max_tokens=4)
    second_task = asyncio.create_task(reply(endless, second))
    third_task = asyncio.create_task(reply(endless, third))
    await eventually(lambda: endless.stats().waiting == 2)
    assert endless.stats().running == 1

    await endless.abort(third.request_id)
    _, text, deltas = await third_task
    assert (text, deltas[-1].finish_reason, deltas[-1].metrics.output_tokens) == ("", "abort", 0)
    assert not second_task.done()

    await first.aclose()
    *_, deltas = await second_task
    assert deltas[-1].finish_reason == "length"


async def test_a_missing_checkpoint_fails_and_says_what_it_expected(tmp_path):
    engine = TransformersEngine(EngineSettings(model=str(tmp_path / "nowhere"), backend="transformers"))
    with pytest.raises(EngineError, match="neither a checkpoint folder nor a hub id"):
        await engine.start()
    assert engine.status().stage is Stage.FAILED
    with pytest.raises(EngineError, match="not ready"):
        await anext(engine.generate(chat("hi")))


@pytest.fixture(scope="module")
def vision(tiny_vision_model_dir):
    engine = started(tiny_vision_model_dir)
    yield engine
    asyncio.run(engine.shutdown())


def image_question(image: Image.Image, soft_tokens: int | None = None) -> GenerationRequest:
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    return GenerationRequest(
        [{"role": "user", "content": content}], SamplingOptions(max_tokens=3), image_soft_tokens=soft_tokens
    )


def tiny_clip(n_frames: int, every: int, fps: float = 10.0) -> VideoClip:
    """Frames 0, every, 2*every, ... of a 96x128 clip at `fps`, as media.load_video returns them."""
    frames = list(np.random.default_rng(1).integers(0, 256, (n_frames, 96, 128, 3), dtype=np.uint8))
    indices = [i * every for i in range(n_frames)]
    total = indices[-1] + 1
    return VideoClip(frames, [i / fps for i in indices], indices, fps, total, total / fps)


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))


@pytest.mark.parametrize("soft_tokens", [None, 70, 1120])
def test_an_image_is_expanded_into_the_soft_tokens_its_budget_gives(vision, soft_tokens):
    prompt, inputs = model_inputs(vision._tokenizer, vision._processor, image_question(IMAGE, soft_tokens))
    budget = {} if soft_tokens is None else {"max_soft_tokens": soft_tokens}
    expected = vision._processor.image_processor(images=[IMAGE], **budget)["num_soft_tokens_per_image"][0]
    assert expected == {None: 266, 70: 63, 1120: 1064}[soft_tokens]  # None: the checkpoint's own 280
    ids = inputs["input_ids"][0]
    assert (ids == TOKEN_ID["<|image|>"]).sum().item() == expected
    assert (ids == TOKEN_ID["<|image>"]).sum().item() == (ids == TOKEN_ID["<image|>"]).sum().item() == 1
    assert prompt.startswith("<bos><|turn>user\n<|image|>What is this?<turn|>")
    assert inputs["pixel_values"].shape[0] == 1


def test_video_frames_are_expanded_with_their_timestamps(vision):
    clip = tiny_clip(4, every=10)  # 0, 1, 2, 3 s of a 10 fps clip
    request = GenerationRequest([{"role": "user", "content": [{"type": "video", "video": clip}]}])
    _, inputs = model_inputs(vision._tokenizer, vision._processor, request)
    ids = inputs["input_ids"][0]
    assert (ids == TOKEN_ID["<|video|>"]).sum().item() == 4 * 63  # 63 soft tokens per 96x128 frame
    assert (ids == TOKEN_ID["<|image>"]).sum().item() == 4  # each frame wrapped in boi/eoi
    decoded = vision._processor.decode(ids).replace("<|video|>", "")
    assert "00:00 <|image><image|> 00:01 <|image><image|> 00:02 <|image><image|> 00:03 <|image><image|>" in decoded


async def test_an_image_question_streams_a_reply_counting_the_expanded_prompt(vision):
    request = image_question(IMAGE)
    *_, deltas = await reply(vision, request)
    _, inputs = model_inputs(vision._tokenizer, vision._processor, request)
    assert deltas[-1].metrics.prompt_tokens == inputs["input_ids"].shape[1] > 266
    assert deltas[-1].metrics.output_tokens > 0


async def test_a_checkpoint_without_a_processor_refuses_media(engine):
    with pytest.raises(EngineError, match="no image/video processor"):
        await anext(engine.generate(image_question(IMAGE)))


def test_sampling_options_map_to_generate_arguments():
    assert generate_kwargs(SamplingOptions(temperature=0, max_tokens=9)) == {
        "max_new_tokens": 9,
        "repetition_penalty": 1.0,
        "do_sample": False,
    }
    assert generate_kwargs(SamplingOptions(temperature=0.7, top_p=0.9, top_k=-1, repetition_penalty=1.1)) == {
        "max_new_tokens": 2048,
        "repetition_penalty": 1.1,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
    }


def test_presence_penalty_lowers_every_token_already_in_the_reply_once():
    prompt_then_reply = torch.tensor([[5, 6, 7, 7, 9]])  # prompt 5 6; reply 7 7 9
    scores = torch.zeros(1, 10)
    penalized = _PresencePenalty(0.5, prompt_length=2)(prompt_then_reply, scores)
    assert penalized.tolist() == [[0, 0, 0, 0, 0, 0, 0, -0.5, 0, -0.5]]
