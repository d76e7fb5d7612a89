"""UI wiring against an in-test Engine double: the chat function, the rendering helpers, the /chat API."""

from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from chat import chat_view, sidebar, ui
from chat.conversation import MediaLimits, Reply
from chat.messages import reply_messages
from chat.status import EngineView
from engine.base import Delta, EngineStats, Metrics, Stage
from engine.settings import EngineSettings
from tests.app_process import free_port
from tests.fakes import CHAT_DEFAULTS, ENGINE_TTFT_S, FakeEngine, texts, titles
from tests.test_media import headerless, write_video


async def run_chat(
    engine: FakeEngine, text: str = "Hi", history: list | None = None, *inputs, files: list[str] = (), limits=None
) -> list[tuple]:
    chat = chat_view.make_chat_fn(engine, limits)
    args = list(CHAT_DEFAULTS)
    args[: len(inputs)] = inputs
    return [out async for out in chat({"text": text, "files": list(files)}, history or [], *args)]


async def test_a_reply_streams_with_live_metrics_and_ends_with_its_stats():
    engine = FakeEngine()
    outs = await run_chat(engine, "Hi", None, "Be brief.", False, 5)
    messages, ttft, tok_s, tokens, replies = outs[-1]
    assert texts(messages)[0] == "w0 w1 w2 w3 w4 "
    # TTFT on the app's clock: the engine's 50 ms plus what the app did first (a few ms here).
    assert ENGINE_TTFT_S <= ttft < ENGINE_TTFT_S + 0.5
    assert titles(messages) == [None, f"TTFT {ttft:.2f} s · 50.0 tok/s · 5 tokens"]
    assert (tok_s, tokens) == (50.0, 5)
    assert replies == [
        {
            "ttft_s": ttft,
            "decode_tok_s": 50.0,
            "output_tokens": 5,
            "prompt_tokens": 7,
            "elapsed_s": pytest.approx(0.13),
            "finish_reason": "length",
        }
    ]
    request = engine.requests[0]
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert request.sampling.max_tokens == 5 and request.sampling.seed is None


async def test_updates_are_throttled_but_keep_coming_while_streaming(monkeypatch):
    monkeypatch.setattr(chat_view, "UI_REFRESH_S", 0.02)
    outs = await run_chat(FakeEngine(token_s=0.005), "Hi", None, "", False, 40)
    assert 3 <= len(outs) < 40
    assert all(o[-1] == gr.skip() for o in outs[:-1])  # the plots change once, at the end


async def test_sampling_controls_reach_the_request():
    engine = FakeEngine()
    await run_chat(engine, "Hi", None, "", True, 3, 0.7, 0.9, 20, 1.1, 0.5, 1234)
    request = engine.requests[0]
    assert request.enable_thinking
    s = request.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.repetition_penalty, s.presence_penalty, s.seed) == (
        0.7,
        0.9,
        20,
        3,
        1.1,
        0.5,
        1234,
    )


async def test_thoughts_are_shown_collapsed_above_the_answer():
    messages = (await run_chat(FakeEngine(), "Hi", None, "", True, 4))[-1][0]
    assert titles(messages)[:2] == ["Thinking", None]
    assert messages[0]["metadata"]["status"] == "done"
    assert texts(messages)[:2] == ["t0 t1 ", "w2 w3 "]


def test_thinking_is_pending_until_the_answer_starts():
    reply = Reply()
    reply.add(Delta(reasoning="hmm", metrics=Metrics(output_tokens=1)))
    assert reply_messages(reply, done=False)[0]["metadata"]["status"] == "pending"
    reply.add(Delta(text="A", metrics=Metrics(output_tokens=2, elapsed_s=1.23)))
    thinking = reply_messages(reply, done=False)[0]["metadata"]
    assert thinking == {"title": "Thinking", "status": "done", "duration": 1.2}


async def test_the_ui_annotations_of_earlier_replies_stay_out_of_the_next_prompt():
    engine = FakeEngine()
    first = await run_chat(engine, "Hi", None, "", True, 4)
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, *first[-1][0]]
    await run_chat(engine, "More", history, "", False, 2)
    assert engine.requests[1].messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "w2 w3 "},
        {"role": "user", "content": "More"},
    ]


@pytest.mark.parametrize(
    ("engine", "title"),
    [
        (
            FakeEngine(Stage.LOADING, "shard 3/7", 0.42),
            "⏳ The engine is still loading: loading weights 42%: shard 3/7",
        ),
        (FakeEngine(Stage.FAILED, "no GPU"), "❌ The engine failed to load"),
    ],
)
async def test_no_request_is_sent_before_the_engine_is_ready(engine, title):
    outs = await run_chat(engine)
    assert len(outs) == 1
    messages = outs[0][0]
    assert titles(messages) == [title]
    if engine.status().failed:
        assert texts(messages) == ["no GPU"]
    assert engine.requests == []


async def test_an_engine_error_keeps_the_partial_answer_and_says_what_happened():
    messages, *_ = (await run_chat(FakeEngine(fail_after=3), "Hi", None, "", False, 10))[-1]
    assert texts(messages)[0] == "w0 w1 w2 "
    assert titles(messages)[1] == "⚠️ The engine failed mid-reply: GPU fell off the bus"
    assert "partial answer above is kept" in texts(messages)[1]


def image_file(path: Path, size: tuple[int, int] = (64, 48)) -> str:
    Image.new("RGB", size, (30, 200, 30)).save(path)
    return str(path)


@pytest.mark.parametrize(("detail", "soft_tokens"), [("minimal", 70), ("medium", 280), ("max", 1120)])
async def test_an_image_reaches_the_engine_with_the_chosen_detail(tmp_path, detail, soft_tokens):
    engine = FakeEngine()
    args = ("", False, 3, 1.0, 0.95, 64, 1.0, 0.0, -1, detail)
    outs = await run_chat(engine, "What is this?", None, *args, files=[image_file(tmp_path / "leaf.png")])
    request = engine.requests[0]
    assert request.image_soft_tokens == soft_tokens
    image, text = request.messages[0]["content"]
    assert image["image"].size == (64, 48) and text == {"type": "text", "text": "What is this?"}
    assert texts(outs[-1][0])[0] == "w0 w1 w2 "  # no notes: nothing to say about a small image


async def test_a_video_shows_the_frames_the_model_sees_above_the_answer(tmp_path):
    engine = FakeEngine()
    clip = write_video(tmp_path / "clip.mp4", 30, 10.0)  # 3 s
    outs = await run_chat(engine, "What happens?", None, "", False, 3, files=[str(clip)])
    messages = outs[-1][0]
    frames = messages[0]
    assert frames["metadata"] == {"title": "🎞️ clip.mp4: the 3 frames the model sees (00:00–00:02)"}
    assert frames["content"][0]["text"] == "Frames at 00:00, 00:01, 00:02"
    sheet = Image.open(frames["content"][1]["path"])
    assert sheet.size == engine.requests[0].messages[0]["content"][0]["video"].contact_sheet().size
    assert texts(messages)[1] == "w0 w1 w2 "
    # Every streamed update keeps the frames above the answer.
    assert all(out[0][0] == frames for out in outs)

    # Titled, the note stays out of the next prompt; the video itself stays in the conversation.
    history = [{"role": "user", "content": [{"type": "file", "file": {"path": str(clip)}}]}, *messages]
    await run_chat(engine, "And then?", history, "", False, 2)
    assert [m["role"] for m in engine.requests[1].messages] == ["user", "assistant", "user"]
    assert engine.requests[1].messages[0]["content"][0]["type"] == "video"


async def test_notes_on_the_attachments_come_before_the_answer(tmp_path):
    big = image_file(tmp_path / "wide.png", (4200, 1050))
    messages = (await run_chat(FakeEngine(), "Hi", None, "", False, 2, files=[big]))[-1][0]
    assert titles(messages)[0] == "ℹ️ About the attachments"
    assert texts(messages)[0].startswith("- wide.png was downscaled from 4200×1050 to ")


def _zero_fps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    headerless(monkeypatch, fps=0.0, count=0, pos_msec=False)
    return str(write_video(tmp_path / "still.mp4", 10, 10.0))


def _oversize(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    path = tmp_path / "huge.png"
    image_file(path)
    with path.open("r+b") as f:
        f.truncate(21 * 1024 * 1024)  # sparse: over the 20 MiB cap without writing it
    return str(path)


def _file(name: str, content: bytes):
    def make(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
        (tmp_path / name).write_bytes(content)
        return str(tmp_path / name)

    return make


ERRORS = {
    "zero bytes": (_file("empty.jpg", b""), "empty.jpg is empty (0 bytes)"),
    "corrupt image": (_file("cat.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100), "cat.png could not be decoded"),
    "corrupt video": (_file("trip.mp4", bytes(range(256)) * 40), "trip.mp4 could not be read as a video"),
    "unsupported type": (_file("paper.pdf", b"%PDF-1.7\n..."), "paper.pdf looks like a PDF document"),
    "over the size cap": (_oversize, "huge.png is 21.0 MiB, over the 20.0 MiB limit for images"),
    "no frames": (lambda m, t: str(write_video(t / "nothing.avi", 0, 10.0, "MJPG")), "nothing.avi contains no frames"),
    "fps 0": (_zero_fps, "still.mp4 doesn't say its frame rate"),
}


@pytest.mark.parametrize("case", ERRORS)
async def test_an_attachment_the_model_cannot_take_is_answered_in_the_chat(monkeypatch, tmp_path, case):
    make, message = ERRORS[case]
    engine = FakeEngine()
    path = make(monkeypatch, tmp_path)
    outs = await run_chat(engine, "what is this?", None, files=[path])
    assert len(outs) == 1 and titles(outs[0][0])[0].startswith(f"⚠️ {message}")
    assert engine.requests == []
    # The conversation goes on: the refused message's text joins the next one, its file left out with a note.
    sent = [{"type": "file", "file": {"path": path}}, {"type": "text", "text": "what is this?"}]
    history = [{"role": "user", "content": sent}, *outs[0][0]]
    outs = await run_chat(engine, "never mind", history, "", False, 2)
    assert engine.requests[0].messages == [{"role": "user", "content": "what is this?\n\nnever mind"}]
    assert titles(outs[-1][0])[0] == "ℹ️ About the attachments" and texts(outs[-1][0])[1] == "w0 w1 "


async def test_more_attachments_than_the_limits_allow_are_answered_in_the_chat(tmp_path):
    engine = FakeEngine()
    files = [image_file(tmp_path / f"p{i}.png") for i in range(3)]
    outs = await run_chat(engine, "compare", None, files=files, limits=MediaLimits(max_images=2))
    assert titles(outs[0][0]) == ["⚠️ 3 images attached: at most 2 go in one message. Send fewer at a time."]
    assert engine.requests == []


async def test_an_empty_message_is_not_sent():
    engine = FakeEngine()
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for past in ([], history):
        outs = await run_chat(engine, "", past)
        assert titles(outs[0][0]) == ["⚠️ Nothing to send: the message is empty"]
    assert engine.requests == []


async def test_closing_the_chat_generator_closes_the_engine_stream():
    engine = FakeEngine(token_s=0.001)
    chat = chat_view.make_chat_fn(engine)
    gen = chat({"text": "Hi", "files": []}, [], "", False, 10_000, *CHAT_DEFAULTS[3:])
    await anext(gen)
    await gen.aclose()
    assert engine.closed_early == [engine.requests[0].request_id]


async def test_cancelling_the_task_closes_the_engine_stream():
    # What Gradio's stop does while the generator is awaiting the engine: cancel the task.
    engine = FakeEngine(token_s=0.001)
    chat = chat_view.make_chat_fn(engine)

    async def consume():
        async for _ in chat({"text": "Hi", "files": []}, [], "", False, 10_000, *CHAT_DEFAULTS[3:]):
            pass

    task = asyncio.create_task(consume())
    while not engine.requests:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.closed_early == [engine.requests[0].request_id]


def status_html(*status) -> str:
    return sidebar.status_html(EngineView(FakeEngine(*status)).snapshot())


def test_status_html_shows_stage_progress_and_failure_reason():
    loading = status_html(Stage.DOWNLOADING, "model-00001.safetensors", 0.5)
    assert "downloading 50%" in loading and '<progress value="0.500"' in loading
    assert "<progress></progress>" in status_html(Stage.COMPILING, "graphs")
    failed = status_html(Stage.FAILED, "CUDA <OOM>")
    assert "failed" in failed and "CUDA &lt;OOM&gt;" in failed and "<progress" not in failed


def test_stats_markdown_handles_backends_that_report_nothing():
    full = sidebar.stats_markdown(EngineStats(0.25, 1, 2, 70.04, 79.6))
    assert "25.0%" in full and "1 / 2" in full and "70.0 / 79.6 GiB" in full
    assert sidebar.stats_markdown(EngineStats(running=0, waiting=0)).count("–") == 2
    assert "no load or memory stats" in sidebar.stats_markdown(EngineStats())


def test_replies_frame_numbers_the_replies():
    frame = sidebar.replies_frame([{"ttft_s": 0.1, "decode_tok_s": 40.0}, {"ttft_s": 0.2, "decode_tok_s": None}])
    assert list(frame["reply"]) == [1, 2] and list(frame.columns) == ["reply", "TTFT (s)", "tok/s"]
    assert sidebar.replies_frame([]).empty


def test_the_chat_api_takes_the_message_then_the_settings():
    demo = ui.build_ui(FakeEngine(), EngineSettings())
    endpoint = demo.get_api_info()["named_endpoints"]["/chat"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == [
        "message",
        "system_prompt",
        "enable_thinking",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "presence_penalty",
        "seed",
        "image_detail",
    ]
    assert all(p["parameter_has_default"] for p in endpoint["parameters"])
    assert [r["label"] for r in endpoint["returns"]] == ["Response", "TTFT (s)", "tok/s", "tokens"]


def test_stop_through_the_api_aborts_the_engine_request():
    engine = FakeEngine(token_s=0.005)
    demo = ui.build_ui(engine, EngineSettings())
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        job = client.submit({"text": "Hi", "files": []}, max_tokens=10_000, api_name="/chat")
        deadline = time.monotonic() + 30
        while not job.outputs() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.outputs(), "no streamed update"
        job.cancel()
        while not engine.closed_early and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.closed_early == [engine.requests[0].request_id]
        messages, *_ = client.predict({"text": "again", "files": []}, max_tokens=3, api_name="/chat")
        assert texts(messages)[0] == "w0 w1 w2 "
        client.close()
    finally:
        demo.close()


def test_an_uploaded_video_and_its_frames_travel_through_the_api(tmp_path):
    engine = FakeEngine()
    demo = ui.build_ui(engine, EngineSettings(max_video_frames=2))
    demo.queue()
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False, download_files=str(tmp_path / "downloads"))
        clip = write_video(tmp_path / "clip.mp4", 30, 10.0)
        message = {"text": "What happens?", "files": [handle_file(str(clip))]}
        messages, *_ = client.predict(message, max_tokens=2, image_detail="high", api_name="/chat")
        client.close()
    finally:
        demo.close()
    request = engine.requests[0]
    video = request.messages[0]["content"][0]["video"]
    assert video.frame_indices == [0, 29] and request.image_soft_tokens == 560  # --max-video-frames 2
    frames = messages[0]
    assert frames["metadata"]["title"] == "🎞️ clip.mp4: the 2 frames the model sees (00:00–00:02)"
    assert Image.open(frames["content"][1]).size == video.contact_sheet().size  # the client downloaded it


def _chat_imports() -> dict[str, set[str]]:
    """Each chat module's imports of other chat modules, anywhere in it: {module: {(module, name), ...}}."""
    folder = Path(ui.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        found = imports.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {(a.name.split(".")[1], "") for a in node.names if a.name.startswith("chat.")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "chat":
                for alias in node.names:
                    found.add((node.module.split(".")[1], alias.name) if "." in node.module else (alias.name, ""))
    return imports


def test_the_ui_modules_import_each_other_without_a_circle_or_private_names():
    imports = _chat_imports()
    assert {"ui", "chat_view", "sidebar", "history_ui", "messages", "status", "arrival"} <= set(imports)
    private = [(m, i) for m, found in imports.items() for i in found if i[1].startswith("_")]
    assert private == []
    graph = {m: {i[0] for i in found} for m, found in imports.items()}

    def reaches(start: str, target: str, seen: frozenset = frozenset()) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m)] == []
    assert not reaches("history_ui", "ui") and not reaches("sidebar", "chat_view")
