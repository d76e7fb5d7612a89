"""Local chat app for Gemma 4 26B-A4B NVFP4: parse the flags, build the engine and the UI, serve.

The UI is up at once; the model loads in the background while the sidebar shows its progress.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from chat.history import DB_FILENAME, HistoryStore, default_data_dir
from chat.limits import Limits
from engine.base import EngineError
from engine.factory import create_engine
from engine.lifecycle import start_in_background
from engine.settings import BACKENDS, EngineSettings

log = logging.getLogger("app")

LOG_LEVELS = ("debug", "info", "warning", "error")


def _auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"expected USER:PASS, got {value!r}")
    return user, password


def _auth_file(value: str) -> list[tuple[str, str]]:
    """USER:PASS a line; blank lines and # comments are skipped."""
    try:
        lines = Path(value).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"can't read {value}: {e.strerror}") from None
    logins = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                logins.append(_auth(line.strip()))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"{value} line {number}: expected USER:PASS") from None
    if not logins:
        raise argparse.ArgumentTypeError(f"{value} holds no USER:PASS line")
    return logins


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if not 0 < number < math.inf:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
        return number

    return parse


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive whole number, got {value!r}")
    return int(value)


def _tokens_or(word: str) -> Callable[[str], int | None]:
    """A positive number of tokens, or `word` for None (the setting's default meaning)."""

    def parse(value: str) -> int | None:
        if value == word:
            return None
        if not value.isdigit() or int(value) == 0:
            raise argparse.ArgumentTypeError(f"expected a number of tokens or {word!r}, got {value!r}")
        return int(value)

    return parse


def _draft_model(value: str) -> str | None:
    return None if value.lower() == "none" else value


def _video_frames(value: str) -> int:
    most = EngineSettings().max_video_frames  # the default is Gemma 4's cap
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise argparse.ArgumentTypeError(f"expected 1 to {most} frames, got {value!r}")
    return int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = EngineSettings()
    p = argparse.ArgumentParser(
        prog="app.py",
        description="Chat with Gemma 4 26B-A4B NVFP4 in the browser, with live time-to-first-token and tok/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model, help="hub id or local directory (the served model name for openai)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help="auto: vLLM on an NVIDIA GPU")
    p.add_argument("--base-url", default=d.base_url, help="OpenAI-compatible server, e.g. http://spark:8000/v1")
    p.add_argument("--api-key", default=d.api_key, help="API key for --base-url")
    p.add_argument("--host", default="127.0.0.1", help="address to serve the UI on (0.0.0.0: whole network)")
    p.add_argument("--port", type=int, default=7860, help="port to serve the UI on")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument(
        "--auth", type=_auth, action="append", metavar="USER:PASS", help="require this login; repeat for more users"
    )
    p.add_argument("--auth-file", type=_auth_file, metavar="FILE", help="require a login: USER:PASS lines of FILE")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help="where the chat history (SQLite) is kept")
    limits = Limits()
    p.add_argument(
        "--max-queue",
        type=_positive(int),
        default=limits.max_queue,
        help="requests waiting their turn; more are refused",
    )
    p.add_argument(
        "--rate-limit",
        type=_count,
        default=limits.rate_per_minute,
        help="messages a browser session may send a minute; 0: no limit",
    )
    p.add_argument(
        "--max-upload-mb", type=_positive(float), default=limits.max_upload_mb, help="largest file one may upload"
    )
    p.add_argument("--desktop", action="store_true", help="open the app in a native window (needs pywebview)")
    p.add_argument(
        "--max-model-len",
        type=_tokens_or("auto"),
        default=d.max_model_len,
        help="context length in tokens, lowered to what the KV cache holds; auto: the model's own",
    )
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, help="vLLM KV cache dtype")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="share of GPU memory vLLM may use",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="replies generated at once (also the UI's concurrency limit)",
    )
    p.add_argument(
        "--tensor-parallel-size", type=int, default=d.tensor_parallel_size, help="GPUs to split the model over"
    )
    p.add_argument("--quantization", default=d.quantization, help="vLLM quantization; None: read from the checkpoint")
    p.add_argument(
        "--moe-backend",
        default=d.moe_backend,
        help="MoE kernel; None: marlin without FP4 tensor cores, else vLLM's choice",
    )
    p.add_argument("--linear-backend", default=d.linear_backend, help="FP4 linear kernel; None: as for --moe-backend")
    p.add_argument(
        "--attention-backend", default=d.attention_backend, help="vLLM attention backend; None: vLLM's choice"
    )
    p.add_argument(
        "--load-format", default=d.load_format, help="vLLM weight loading; dummy: random weights of the model's shapes"
    )
    p.add_argument(
        "--cuda-graph-max-tokens",
        type=_tokens_or("none"),
        default=d.cuda_graph_max_tokens,
        help="batches of up to this many tokens, prompt chunks included, run as CUDA graphs; "
        "none: vLLM's default (2 x --max-num-seqs)",
    )
    p.add_argument(
        "--no-torch-compile",
        action="store_true",
        help="skip torch.compile: a faster first start (decode steps still run as CUDA graphs)",
    )
    p.add_argument(
        "--draft-model",
        type=_draft_model,
        default=d.draft_model,
        help="Gemma 4 assistant for MTP speculative decoding (vllm backend): folder, hub id, auto (the assistant "
        "published with the model; skipped with a note when it can't be had) or none. Helps one stream a little, "
        "costs several streams much (README: measured results)",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=_positive(int),
        default=d.num_speculative_tokens,
        help="tokens the MTP drafter proposes a step",
    )
    p.add_argument(
        "--max-video-frames",
        type=_video_frames,
        default=d.max_video_frames,
        help=f"frames the model sees of a video, 1 to {d.max_video_frames}",
    )
    p.add_argument(
        "--video-fps",
        type=_positive(float),
        default=d.video_fps,
        help="frames taken per second of video; a longer clip gets --max-video-frames spread over it",
    )
    p.add_argument("--no-browser", action="store_true", help="don't open a browser tab")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="server log verbosity")
    return p.parse_args(argv)


def settings_from_args(ns: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        model=ns.model,
        backend=ns.backend,
        base_url=ns.base_url,
        api_key=ns.api_key,
        max_model_len=ns.max_model_len,
        kv_cache_dtype=ns.kv_cache_dtype,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        max_num_seqs=ns.max_num_seqs,
        tensor_parallel_size=ns.tensor_parallel_size,
        quantization=ns.quantization,
        moe_backend=ns.moe_backend,
        linear_backend=ns.linear_backend,
        attention_backend=ns.attention_backend,
        load_format=ns.load_format,
        cuda_graph_max_tokens=ns.cuda_graph_max_tokens,
        torch_compile=not ns.no_torch_compile,
        draft_model=ns.draft_model,
        num_speculative_tokens=ns.num_speculative_tokens,
        max_video_frames=ns.max_video_frames,
        video_fps=ns.video_fps,
    )


def logins(ns: argparse.Namespace) -> list[tuple[str, str]] | None:
    return [*(ns.auth or []), *(ns.auth_file or [])] or None


SHARE_WITHOUT_AUTH = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  --share without --auth: ANYONE who gets the public link can use this app and your GPU.
!!  Add --auth USER:PASS (or --auth-file FILE) to require a login.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    ns = parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests, one line each
    settings = settings_from_args(ns)
    try:
        engine = create_engine(settings)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    try:
        store = HistoryStore(ns.data_dir / DB_FILENAME)
    except (OSError, sqlite3.Error, RuntimeError) as e:
        print(f"error: can't open the chat history in {ns.data_dir}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("chat history: %s", store.path)

    from chat.desktop import open_window  # here: gradio takes seconds to import, --help needn't wait
    from chat.ui import TITLE, build_ui, launch_options

    limits = Limits(max_queue=ns.max_queue, rate_per_minute=ns.rate_limit, max_upload_mb=ns.max_upload_mb)
    demo = build_ui(engine, settings, store, limits)
    start_in_background(engine)
    demo.queue(default_concurrency_limit=settings.max_num_seqs, max_size=limits.max_queue)
    auth = logins(ns)
    if ns.share and not auth:
        print(SHARE_WITHOUT_AUTH, file=sys.stderr, flush=True)
    # SIGTERM stops the server like Ctrl+C does, so the engine below is shut down (vLLM's engine process too).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.launch(
            server_name=ns.host,
            server_port=ns.port,
            inbrowser=not ns.no_browser and not ns.desktop,
            share=ns.share,
            auth=auth,
            max_file_size=int(limits.max_upload_mb * 2**20),
            prevent_thread_lock=True,
            **launch_options(),
        )
        if ns.share and not demo.share_url:
            log.warning(
                "could not open a share link (no internet, or gradio.live unreachable); serving locally only at %s",
                demo.local_url,
            )
        # A native window serves until it is closed; a browser tab (or none), until Ctrl+C or SIGTERM.
        if not (ns.desktop and open_window(demo.local_url, TITLE)):
            demo.block_thread()
    finally:
        demo.close()
        asyncio.run(engine.shutdown())
        store.close()


if __name__ == "__main__":
    main()
