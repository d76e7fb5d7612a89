"""/v1 on the app's own port: vLLM's OpenAI-compatible routes over the app's AsyncLLM, behind a guard.

    api = OpenAIServer(engine, decide_access(key=..., no_api=..., host=..., share=..., login=...))
    demo.launch(..., **api.launch_options(launch_options()))     # one process, one port, one AsyncLLM

vLLM builds its API over an engine that already exists (`openai_routes`: vLLM's build_app + init_app_state, found
wherever the installed vLLM keeps them). That FastAPI app keeps vLLM's serving objects in its own app.state, which
its handlers read through request.app, and it brings its own exception handlers: so it is not merged into Gradio's
app but called as an ASGI app of its own, by a middleware on Gradio's app that owns /v1 and /health (the guard).
Starlette sets scope["app"] to the app being called, so vLLM's handlers find their state; every other path goes on
to Gradio untouched (its page, login, queue and share link). vLLM's app is reachable only through the guard.

The guard answers, in this order: 404 with --no-api; 403 when /v1 is off because the app is reachable by others
(--share, a non-loopback --host, a login) and no key is set; 401 without the right `Authorization: Bearer KEY`
(compared in constant time; Gradio's login cookie opens nothing here); 501 for the transformers and openai
backends; 503 with the stage while the engine loads, and with the reason when it failed. All of them JSON in
OpenAI's error shape. The routes are attached when the engine becomes ready and again after a restart (the
Restart button builds a new AsyncLLM): a task on the server's loop watches for it, and a request that comes first
attaches them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
import importlib.metadata
import ipaddress
import itertools
import json
import logging
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from engine.base import Engine, EngineError

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
HEALTH = "/health"
# Gemma 4's parsers as vLLM registers them (vllm/tool_parsers/__init__.py, vllm/reasoning/__init__.py): tool calls
# come back as OpenAI tool_calls, thinking as the `reasoning` field.
TOOL_PARSER = "gemma4"
REASONING_PARSER = "gemma4"
ATTACH_POLL_S = 0.5  # how often the watcher looks for a newly ready engine
KEY_VARIABLE = "GEMMA4_API_KEY"  # what the snippets read the key from on the client's side


# ------------------------------------------------------------------------------------------- who may call /v1


@dataclass(frozen=True)
class ApiAccess:
    """Whether /v1 is served and who may call it, decided once from the serving flags."""

    served: bool
    key: str | None = field(default=None, repr=False)  # required as `Authorization: Bearer KEY`; None: no key
    off: str = ""  # why /v1 is off, for the log, the sidebar and the 403/404 (empty while served)
    local_only: bool = True  # reachable from this machine only (loopback host, no share link)
    no_api: bool = False  # off by --no-api (404), not for want of a key (403)

    @property
    def key_required(self) -> bool:
        return self.key is not None


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def decide_access(*, key: str | None, no_api: bool, host: str, share: bool, login: bool) -> ApiAccess:
    """/v1 is on by default for this machine only. Reachable by others (--share, a host other than loopback) it
    needs a key; with a login it does too, since the page's login does not cover /v1."""
    local_only = not share and is_loopback(host)
    if no_api:
        return ApiAccess(False, off="/v1 is off (--no-api)", local_only=local_only, no_api=True)
    if key:
        return ApiAccess(True, key, local_only=local_only)
    reasons = []
    if share:
        reasons.append("--share makes this app public")
    if not is_loopback(host):
        reasons.append(f"--host {host} serves it beyond this machine")
    if login:
        reasons.append("the page's login (--auth) does not cover /v1")
    if reasons:
        off = f"/v1 is off: {'; '.join(reasons)}; start the app with --api-key KEY (or --api-key-file FILE) to serve it"
        return ApiAccess(False, off=off, local_only=local_only)
    return ApiAccess(True, local_only=True)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def bearer_matches(authorization: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time (digests of equal length, whatever was sent)."""
    scheme, _, given = (authorization or "").partition(" ")
    return hmac.compare_digest(_digest(given.strip()), _digest(key)) and scheme.lower() == "bearer"


# ------------------------------------------------------------------------------------------- vLLM's own routes


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as 0.26.0 or 0.29.1rc2.dev3+g1234."""
    numbers = [int("".join(itertools.takewhile(str.isdigit, part)) or 0) for part in text.split(".")[:2]]
    return tuple(numbers + [0] * (2 - len(numbers)))


# Where vLLM keeps the functions that build its OpenAI-compatible app over an engine client, and its `vllm serve`
# argument parser: (app modules, argument modules). Up to 0.28 in vllm.entrypoints.openai; from 0.29 under
# vllm.entrypoints.launchers (tried first there, the old places after them).
_UP_TO_0_28 = (("vllm.entrypoints.openai.api_server",), ("vllm.entrypoints.openai.cli_args",))
_FROM_0_29 = (
    ("vllm.entrypoints.launchers.app_state", "vllm.entrypoints.launchers.api_server.app_state"),
    ("vllm.entrypoints.launchers.cli_args",),
)


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """vLLM's API server imports model_hosting_container_standards (SageMaker's), which sets the root logger and
    its handlers to ERROR on import: the app's own log would go quiet from then on."""
    root = logging.getLogger()
    level, handlers = root.level, [(handler, handler.level) for handler in root.handlers]
    try:
        yield
    finally:
        root.setLevel(level)
        for handler, handler_level in handlers:
            handler.setLevel(handler_level)


def _first(modules: tuple[str, ...], *names: str) -> Any:
    for name in modules:
        try:
            with _root_logging_kept():
                module = importlib.import_module(name)
        except ImportError:
            continue
        if all(hasattr(module, n) for n in names):
            return module
    raise EngineError(
        f"vLLM {importlib.metadata.version('vllm')} has no {' / '.join(names)} in {', '.join(modules)}: "
        "engine/openai_server.py needs to learn where this vLLM keeps them"
    )


def vllm_api() -> SimpleNamespace:
    """The installed vLLM's build_app, init_app_state, make_arg_parser and validate_parsed_serve_args: the one
    place that knows where each vLLM version keeps them."""
    apps, cli = _UP_TO_0_28
    if _version(importlib.metadata.version("vllm")) >= (0, 29):
        apps, cli = _FROM_0_29[0] + apps, _FROM_0_29[1] + cli
    server = _first(apps, "build_app", "init_app_state")
    cli_args = _first(cli, "make_arg_parser", "validate_parsed_serve_args")
    return SimpleNamespace(
        build_app=server.build_app,
        init_app_state=server.init_app_state,
        make_arg_parser=cli_args.make_arg_parser,
        validate_parsed_serve_args=cli_args.validate_parsed_serve_args,
    )


def serve_args(model_path: str, served_model_name: str) -> Any:
    """`vllm serve`'s arguments for this app's /v1: vLLM's own parser, so every field its serving layer reads has
    its default; CORS is left to Gradio's middleware (vLLM's default would allow every origin); the key is checked
    by the guard, not by vLLM."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    api = vllm_api()
    argv = ["--model", model_path, "--served-model-name", served_model_name]
    argv += ["--enable-auto-tool-choice", "--tool-call-parser", TOOL_PARSER, "--reasoning-parser", REASONING_PARSER]
    argv += ["--allowed-origins", "[]", "--disable-fastapi-docs"]
    args = api.make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    # `vllm serve` copies the reasoning parser here while it builds the engine's config; this engine exists already.
    args.structured_outputs_config.reasoning_parser = args.reasoning_parser
    api.validate_parsed_serve_args(args)
    return args


async def openai_routes(engine_client: Any, *, served_model_name: str, allow_file_urls: bool) -> Any:
    """vLLM's OpenAI-compatible FastAPI app (/v1/models, /v1/chat/completions, /v1/completions, /v1/responses,
    /health, ...) over an engine that already runs, as `vllm serve` builds it over its own; its serving objects
    live in the returned app's state. `allow_file_urls`: file:// image and video URLs may name any file here."""
    api = vllm_api()
    model_config = engine_client.model_config
    # vLLM reads this from the model config for each request (chat_utils); the app's own chats never use URLs.
    model_config.allowed_local_media_path = "/" if allow_file_urls else ""
    tasks = await engine_client.get_supported_tasks()  # an engine call: on the loop that serves the engine

    def build() -> Any:
        args = serve_args(model_config.model, served_model_name)
        app = api.build_app(args, tasks, model_config)
        # init_app_state only constructs (it calls the engine for nothing), but it warms up the chat template and
        # the multimodal processor on dummy inputs for seconds: on a thread, the server's loop keeps serving.
        asyncio.run(api.init_app_state(engine_client, app.state, args, tasks))
        return app

    return await asyncio.to_thread(build)


# ------------------------------------------------------------------------------------------- the guard


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status, **extra}}, status, headers)


@dataclass
class _Attached:
    llm: Any  # the AsyncLLM the routes were built over
    app: Any = None  # vLLM's FastAPI app; None when building it failed
    failure: str = ""


class OpenAIServer:
    """/v1 and /health of one app: the access rules, the engine, and vLLM's app over the engine's current AsyncLLM."""

    def __init__(self, engine: Engine, access: ApiAccess):
        self.engine = engine
        self.access = access
        self._attached: _Attached | None = None
        self._lock: asyncio.Lock | None = None  # made on the server's loop, the only one that serves
        self._watcher: asyncio.Task | None = None

    # -- wiring

    def middleware(self) -> Middleware:
        return Middleware(_Guard, server=self)

    def launch_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """`Blocks.launch` arguments with the guard added to the app's middleware (after the caller's own)."""
        app_kwargs = dict(options.get("app_kwargs") or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), self.middleware()]
        return {**options, "app_kwargs": app_kwargs}

    @staticmethod
    def owns(path: str) -> bool:
        return path == API_PREFIX or path.startswith(API_PREFIX + "/") or path == HEALTH

    @property
    def serves_vllm(self) -> bool:
        return self.engine.name == "vllm" and hasattr(self.engine, "async_llm")

    @property
    def attached(self) -> bool:
        """vLLM's routes are attached to the engine's current AsyncLLM."""
        current = self._attached
        return current is not None and current.app is not None and current.llm is self._ready_llm()

    # -- what a request gets

    def refusal(self, headers: dict[str, str]) -> JSONResponse | None:
        """The answer to a /v1 request that doesn't reach vLLM, or None when it may."""
        access = self.access
        if not access.served:
            return _error(404 if access.no_api else 403, "api_off", access.off)
        if access.key is not None and not bearer_matches(headers.get("authorization"), access.key):
            message = "Missing or wrong API key: send the key given to --api-key as `Authorization: Bearer KEY`"
            return _error(401, "authentication_error", message, {"WWW-Authenticate": "Bearer"})
        if not self.serves_vllm:
            remote = {"server": self._remote()} if self._remote() else {}
            return _error(501, "not_implemented", self._not_vllm(), **remote)
        status = self.engine.status()
        if status.failed:
            message = (
                f"The engine failed: {status.detail}. Restart it from the app's sidebar (Restart the engine) "
                "or restart the app"
            )
            return _error(503, "engine_failed", message, {"Retry-After": "30"}, stage=status.stage.value)
        if not status.ready or self._ready_llm() is None:
            stage = status.stage.value if not status.ready else "restarting"
            detail = status.detail if not status.ready else "the engine is restarting"
            message = f"The engine is still loading: {stage}" + (f" ({detail})" if detail else "")
            extra = {"stage": stage, "detail": detail, "progress": status.progress}
            return _error(503, "engine_loading", message, {"Retry-After": "5"}, **extra)
        return None

    def _remote(self) -> str | None:
        return getattr(getattr(self.engine, "settings", None), "base_url", None)

    def _not_vllm(self) -> str:
        if self.engine.name == "openai":
            return (
                f"This app chats with the OpenAI-compatible server at {self._remote()} (--backend openai): "
                "call that server's /v1 directly; /v1 here needs --backend vllm"
            )
        return (
            f"/v1 needs the vllm backend: this app runs --backend {self.engine.name}, which has no OpenAI-compatible "
            "server; start it with --backend vllm on an NVIDIA GPU"
        )

    def _ready_llm(self) -> Any:
        if not self.serves_vllm or not self.engine.status().ready:
            return None
        return self.engine.async_llm

    async def routes(self) -> _Attached | None:
        """vLLM's app over the engine's current AsyncLLM, built the first time it is asked for: None while there
        is none (loading, restarting)."""
        llm = self._ready_llm()
        if llm is None:
            self._attached = None  # drops a shut-down engine's routes (and the engine) at once
            return None
        if self._attached is not None and self._attached.llm is llm:
            return self._attached
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._attached is None or self._attached.llm is not llm:
                self._attached = await self._attach(llm)
        return self._attached

    async def _attach(self, llm: Any) -> _Attached:
        try:
            app = await openai_routes(llm, served_model_name=self.engine.model, allow_file_urls=self.access.local_only)
        except Exception as e:
            log.exception("could not attach vLLM's /v1 routes to the engine")
            return _Attached(llm, failure=f"{type(e).__name__}: {e}")
        log.info("/v1: vLLM's OpenAI-compatible routes attached to the engine (model %r)", self.engine.model)
        return _Attached(llm, app)

    def watch(self) -> None:
        """Attach the routes as soon as the engine is ready (and again after each restart), on the server's loop,
        so the first /v1 request doesn't wait for vLLM's serving objects to be built."""
        if self._watcher is None and self.access.served and self.serves_vllm:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="openai-routes")

    async def _watch(self) -> None:
        while True:
            try:
                await self.routes()
            except Exception:  # keep watching: a request attaches the routes itself anyway
                log.exception("/v1: watching the engine failed")
            await asyncio.sleep(ATTACH_POLL_S)

    async def serve(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        response = self.refusal(headers)
        if response is None:
            attached = await self.routes()
            if attached is None:  # the engine went away between the check and now
                response = self.refusal(headers) or _error(503, "engine_loading", "The engine is restarting")
            elif attached.app is None:
                message = f"vLLM's /v1 routes could not be built: {attached.failure} (see the server log)"
                response = _error(503, "api_unavailable", message)
            else:
                await attached.app(scope, receive, send)
                return
        await response(scope, receive, send)

    # -- what people are told

    def status_line(self, url: str) -> tuple[int, str]:
        """The log's line about /v1 (level, text); `url`: the app's address."""
        root = url.rstrip("/")
        if not self.access.served:
            return (logging.INFO if self.access.no_api else logging.WARNING), self.access.off
        if not self.serves_vllm:
            return logging.INFO, f"/v1 answers 501: {self._not_vllm()}"
        who = "Bearer key required" if self.access.key_required else "no key: for this machine only"
        return logging.INFO, f"OpenAI-compatible API (vLLM's routes) at {root}/v1 ({who})"

    def log_status(self, *urls: str | None) -> None:
        """The log's line about /v1: one for each address the app serves (local URL, share link) while /v1 is
        served, else one saying why not."""
        urls = tuple(u for u in urls if u) or ("",)
        for url in urls if self.access.served and self.serves_vllm else urls[:1]:
            log.log(*self.status_line(url))

    def snippets(self, base_url: str) -> dict[str, str]:
        """Copy-paste clients for this app's /v1 (`base_url`: its address as the reader sees it, share link
        included): a streaming chat with curl and with openai-python. The key stays out of them (the page is seen
        by people who may not hold it): they read it from $GEMMA4_API_KEY."""
        root = base_url.rstrip("/") + API_PREFIX
        model = self.engine.model
        body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "stream": True}
        curl = [f"curl {shlex.quote(root + '/chat/completions')}"]
        if self.access.key_required:
            curl.append(f'-H "Authorization: Bearer ${KEY_VARIABLE}"')
        curl += ['-H "Content-Type: application/json"', f"-d {shlex.quote(json.dumps(body))}"]
        key = f'os.environ["{KEY_VARIABLE}"]' if self.access.key_required else '"EMPTY"'
        python = "\n".join(
            [
                *(["import os", ""] if self.access.key_required else []),
                "from openai import OpenAI",
                "",
                f'client = OpenAI(base_url="{root}", api_key={key})',
                "stream = client.chat.completions.create(",
                f'    model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], stream=True',
                ")",
                "for chunk in stream:",
                '    print(chunk.choices[0].delta.content or "", end="", flush=True)',
            ]
        )
        return {"curl": " \\\n  ".join(curl), "python": python}

    def sidebar_markdown(self, base_url: str) -> str:
        """The sidebar's paragraph on /v1: where it is and who may call it, with the snippets as copyable code
        blocks; or why it is off, or which backend it needs."""
        title = "**OpenAI-compatible API**"
        if not self.access.served:
            return f"{title}: {self.access.off}."
        if not self.serves_vllm:
            return f"{title}: {self._not_vllm()}."
        root = base_url.rstrip("/") + API_PREFIX
        if self.access.key_required:
            who = f"requires `Authorization: Bearer KEY`, the key given to `--api-key` (set `${KEY_VARIABLE}`)"
        else:
            who = "no key: this machine only"
        code = self.snippets(base_url)
        return "\n\n".join(
            [
                f"{title} at `{root}` · {who}",
                f"```bash\n{code['curl']}\n```",
                f"```python\n{code['python']}\n```",
            ]
        )


class _Guard:
    """ASGI middleware on Gradio's app: /v1 and /health go to OpenAIServer, everything else on to Gradio."""

    def __init__(self, app: Any, server: OpenAIServer):
        self.app = app
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            self.server.watch()
            path = scope["path"].removeprefix(scope.get("root_path") or "")
            if self.server.owns(path):
                await self.server.serve(scope, receive, send)
                return
        await self.app(scope, receive, send)
