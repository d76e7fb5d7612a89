"""Hugging Face transformers in this process: a small Gemma 4 on the CPU (or one GPU) without vLLM.

One generation runs at a time; other requests wait for it. `model.generate()` runs in a worker thread
and hands each token id to the request's event loop as it comes out. Abort is a flag that a stopping
criterion reads after every token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    BatchEncoding,
    BatchFeature,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from engine import model_source
from engine.base import Delta, EngineError, EngineStats, EngineStatus, GenerationRequest, SamplingOptions, Stage
from engine.experts import PROMPT_TOKENS, ExpertCounts
from engine.metrics import RequestClock
from engine.prompt import render_chat, take_media
from engine.reasoning import ReasoningSplitter
from engine.settings import EngineSettings

_POLL_S = 0.02  # how often a waiting request checks whether the model is free


class TransformersEngine:
    name = "transformers"

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.model = settings.model
        self._status = EngineStatus(Stage.RESOLVING, f"reading {settings.model}")
        self._model: Any = None
        self._tokenizer: Any = None
        self._processor: Any = None  # Gemma4Processor for image and video prompts; None for a text-only checkpoint
        self._device = "cpu"
        self._expert_shape: tuple[int, int, int] | None = None  # --expert-view on a model with experts
        self.max_model_len: int | None = None  # context in tokens, known once loaded; the UI checks prompts against it
        # Held by the worker thread of the running generation, so the next one starts only once it has stopped.
        self._busy = threading.Lock()
        self._stops: dict[str, threading.Event] = {}  # every request inside generate(), waiting or running

    def status(self) -> EngineStatus:
        return self._status

    async def start(self) -> None:
        # Only thread-safe state is built here: start() and generate() may run on different event loops.
        try:
            await asyncio.to_thread(self._load)
        except Exception as e:
            reason = str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
            self._status = EngineStatus(Stage.FAILED, reason)
            raise EngineError(reason) from e
        self._status = EngineStatus(Stage.READY, f"bf16 on {self._device}")

    def _load(self) -> None:
        checkpoint = model_source.resolve(
            self.settings.model,
            lambda fraction, detail: setattr(self, "_status", EngineStatus(Stage.DOWNLOADING, detail, fraction)),
        )
        path = checkpoint.path
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = AutoProcessor.from_pretrained(path) if checkpoint.has_vision else None
        except OSError as e:
            raise EngineError(
                f"Could not read the checkpoint at {str(path)!r} ({e}). Pass --model with a Gemma 4 checkpoint folder."
            ) from e
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._status = EngineStatus(Stage.LOADING, f"loading weights (bf16 on {self._device})")
        # For Gemma 4 this is Gemma4ForConditionalGeneration, vision tower included.
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.bfloat16)
        self._model = model.to(self._device).eval()
        self._tokenizer = tokenizer
        self._processor = processor
        self._expert_shape = expert_shape(config) if self.settings.expert_view else None
        own = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        self.max_model_len = min((n for n in (own, self.settings.max_model_len) if n), default=None)

    def _ready(self) -> tuple[Any, Any]:
        if self._model is None:
            raise EngineError(f"The engine is not ready: {self._status.stage.value} {self._status.detail}")
        return self._model, self._tokenizer

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The request's prompt length in tokens, for the UI's context check."""
        _, tokenizer = self._ready()
        return model_inputs(tokenizer, self._processor, request)[1]["input_ids"].shape[1]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        model, tokenizer = self._ready()
        clock = RequestClock()
        stop = threading.Event()
        self._stops[request.request_id] = stop
        try:
            # In a thread: the image and video processors take a while on a long video.
            prompt, inputs = await asyncio.to_thread(model_inputs, tokenizer, self._processor, request)
            clock.prompt_tokens = inputs["input_ids"].shape[1]
            experts = tap = None
            if self._expert_shape is not None:  # the routers' choices, counted as vLLM's: the prompt's last tokens
                counted = min(clock.prompt_tokens, PROMPT_TOKENS)
                experts = ExpertCounts.empty(*self._expert_shape, prompt_size=counted)
                tap = _RouterTap(model, self._expert_shape, skip=clock.prompt_tokens - counted)
            while not self._busy.acquire(blocking=False):
                if stop.is_set():
                    yield Delta(finish_reason="abort", metrics=clock.metrics())
                    return
                await asyncio.sleep(_POLL_S)

            loop = asyncio.get_running_loop()
            events: asyncio.Queue[tuple[str, Any, float]] = asyncio.Queue()

            def emit(kind: str, value: Any) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (kind, value, time.perf_counter()))
                except RuntimeError:  # the request's loop is closed: nobody is listening any more
                    stop.set()

            eos_ids = _eos_ids(model)
            worker = threading.Thread(
                target=self._generate_in_thread,
                args=(model, inputs.to(self._device), request.sampling, stop, emit, tap),
                name=f"transformers-generate-{request.request_id[:8]}",
                daemon=True,
            )
            try:
                worker.start()
            except BaseException:
                self._busy.release()
                raise

            detokenizer = _Detokenizer(tokenizer, skip=eos_ids)
            splitter = ReasoningSplitter(prompt)
            while True:
                kind, value, at = await events.get()
                if kind == "error":
                    raise EngineError(f"Generation failed: {type(value).__name__}: {value}") from value
                if kind == "end":
                    break
                if kind == "routing":  # the routing of the step whose token comes next
                    experts = experts.add(value)
                    continue
                clock.tokens_arrived(len(value), now=at)
                reasoning, text = splitter.feed(detokenizer.add(value))
                if reasoning or text:
                    yield Delta(text, reasoning, None, clock.metrics(), experts)

            reasoning, text = splitter.feed(detokenizer.add([], final=True))
            tail_reasoning, tail_text = splitter.flush()
            ids = detokenizer.generated
            if ids and ids[-1] in eos_ids:
                finish = "stop"
            elif stop.is_set():
                finish = "abort"
            else:
                finish = "length"  # max_tokens, or the model's own length limit
            yield Delta(text + tail_text, reasoning + tail_reasoning, finish, clock.metrics(), experts)
        finally:
            stop.set()  # a consumer that stops early (aclose, cancellation) stops the worker
            self._stops.pop(request.request_id, None)

    def _generate_in_thread(
        self,
        model: Any,
        inputs: BatchEncoding | BatchFeature,
        sampling: SamplingOptions,
        stop: threading.Event,
        emit: Callable[[str, Any], None],
        tap: _RouterTap | None = None,
    ) -> None:
        try:
            if tap is not None:
                tap.install()  # only for this generation, which holds the model alone
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)  # the global generator: safe while one generation runs at a time
            processors = LogitsProcessorList()
            if sampling.presence_penalty:
                processors.append(_PresencePenalty(sampling.presence_penalty, inputs["input_ids"].shape[1]))
            model.generate(
                **inputs,
                streamer=_TokenStreamer(emit, tap),
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                logits_processor=processors,
                **generate_kwargs(sampling),
            )
            emit("end", None)
        except Exception as e:
            emit("error", e)
        finally:
            if tap is not None:
                tap.remove()
            self._busy.release()

    async def abort(self, request_id: str) -> None:
        if (stop := self._stops.get(request_id)) is not None:
            stop.set()

    def stats(self) -> EngineStats:
        running = 1 if self._busy.locked() else 0
        used = total = None
        if self._device == "cuda":
            free, total_bytes = torch.cuda.mem_get_info()
            used, total = (total_bytes - free) / 2**30, total_bytes / 2**30
        return EngineStats(
            running=running,
            waiting=max(len(self._stops) - running, 0),
            gpu_memory_used_gib=used,
            gpu_memory_total_gib=total,
        )

    async def shutdown(self) -> None:
        for stop in list(self._stops.values()):
            stop.set()
        while self._busy.locked():  # the running generation stops after its current token
            await asyncio.sleep(_POLL_S)
        self._model = self._tokenizer = self._processor = None


def model_inputs(
    tokenizer: Any, processor: Any, request: GenerationRequest
) -> tuple[str, BatchEncoding | BatchFeature]:
    """The prompt text and generate()'s inputs for it: text through the tokenizer, media through the processor,
    which expands each image and video frame into its soft tokens and computes the pixel values."""
    messages, images, videos = take_media(request.messages)
    if not images and not videos:
        prompt = render_chat(tokenizer, messages, enable_thinking=request.enable_thinking)
        # The template writes <bos> itself.
        return prompt, tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    if processor is None:
        raise EngineError("This checkpoint has no image/video processor (processor_config.json): send text only.")
    prompt = render_chat(processor, messages, enable_thinking=request.enable_thinking)
    media: dict[str, Any] = {}
    if images:
        media["images"] = images
        if request.image_soft_tokens:
            media["images_kwargs"] = {"max_soft_tokens": request.image_soft_tokens}
    if videos:
        # The frames are chosen already (media.video); the metadata stamps each with its mm:ss time.
        media["videos"] = [clip.as_array() for clip in videos]
        media["video_metadata"] = [clip.hf_metadata() for clip in videos]
        media["do_sample_frames"] = False
    return prompt, processor(text=prompt, add_special_tokens=False, return_tensors="pt", **media)


def generate_kwargs(sampling: SamplingOptions) -> dict[str, Any]:
    """SamplingOptions as `generate()` arguments; they override the checkpoint's generation_config."""
    kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "repetition_penalty": sampling.repetition_penalty}
    if sampling.temperature <= 0:
        return kwargs | {"do_sample": False}  # greedy; the checkpoint's top_p/top_k then go unused
    return kwargs | {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": max(sampling.top_k, 0),  # 0 turns top-k off, as -1 does in vLLM
    }


def _eos_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


def expert_shape(config: Any) -> tuple[int, int, int] | None:
    """(layers, experts, top_k) of a Gemma 4 with routed experts; None for a dense one."""
    text = getattr(config, "text_config", config)
    if not getattr(text, "enable_moe_block", False) or not getattr(text, "num_experts", None):
        return None
    return text.num_hidden_layers, text.num_experts, text.top_k_experts


def moe_routers(model: Any) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router) of each Gemma 4 text decoder layer with experts."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer

    return [
        (m.layer_idx, m.router)
        for m in model.modules()
        if isinstance(m, Gemma4TextDecoderLayer) and getattr(m, "enable_moe_block", False)
    ]


class _RouterTap:
    """--expert-view: a forward hook on each Gemma 4 router keeps the top-k expert ids it returns (what the experts
    then run: `Gemma4TextRouter.forward` -> (probabilities, weights, top_k_index)). `take` gives a step's ids as
    [tokens, layers, top_k], vLLM's layout, leaving out the first `skip` prompt tokens. Hooks live for one
    generation (install/remove in its thread); the ids stay on the model's device until `take`, which copies once
    a step."""

    def __init__(self, model: Any, shape: tuple[int, int, int], skip: int = 0):
        self._routers = moe_routers(model)
        self._layers, _, self._top_k = shape
        self._skip = skip
        self._step: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def install(self) -> None:
        for layer, router in self._routers:
            self._handles.append(router.register_forward_hook(self._hook(layer)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int) -> Callable[..., None]:
        def keep(module: Any, args: Any, output: tuple[torch.Tensor, ...]) -> None:
            self._step[layer] = output[2]

        return keep

    def take(self) -> np.ndarray | None:
        if not self._step:
            return None
        tokens = next(iter(self._step.values())).shape[0]
        layers = sorted(self._step)
        ids = torch.zeros((tokens, self._layers, self._top_k), dtype=torch.int16)  # a layer without routing: 0s
        ids[:, layers] = torch.stack([self._step[layer] for layer in layers], dim=1).to("cpu", torch.int16)
        self._step.clear()
        rows = ids.numpy()[self._skip :]
        self._skip = 0
        return rows


class _Detokenizer:
    """Decodes the growing reply and returns what is new, holding back a trailing half UTF-8 character.

    Special tokens stay in the text (the reasoning splitter needs Gemma 4's channel markers) except
    `skip`, the end-of-turn ids that only stop generation.
    """

    def __init__(self, tokenizer: Any, skip: set[int]):
        self._tokenizer = tokenizer
        self._skip = skip
        self.generated: list[int] = []
        self._shown: list[int] = []
        self._sent = 0

    def add(self, ids: list[int], final: bool = False) -> str:
        self.generated += ids
        self._shown += [i for i in ids if i not in self._skip]
        text = self._tokenizer.decode(self._shown, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        new = text[self._sent :]
        if not final:
            new = new.rstrip("\ufffd")  # bytes of a character whose rest is in the next token
        self._sent += len(new)
        return new


class _TokenStreamer(BaseStreamer):
    """generate()'s streamer: passes each new token id on, after the routing of the step that made it (when a tap
    records it); the first put() is the prompt, skipped."""

    def __init__(self, emit: Callable[[str, Any], None], tap: _RouterTap | None = None):
        self._emit = emit
        self._tap = tap
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self._tap is not None and (routing := self._tap.take()) is not None:
            self._emit("routing", routing)
        self._emit("tokens", value.view(-1).tolist())

    def end(self) -> None:
        pass


class _StopWhenSet(StoppingCriteria):
    """Ends generation after the current token once the request's stop flag is set (abort)."""

    def __init__(self, stop: threading.Event):
        self._stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self._stop.is_set(), dtype=torch.bool, device=input_ids.device)


class _PresencePenalty(LogitsProcessor):
    """Presence penalty as vLLM and OpenAI define it (transformers has none): `penalty` off each token in the reply."""

    def __init__(self, penalty: float, prompt_length: int):
        self._penalty = penalty
        self._prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        reply = input_ids[:, self._prompt_length :]
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, reply, True)
        return scores - self._penalty * seen
