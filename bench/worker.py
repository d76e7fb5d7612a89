"""One configuration of the benchmark: start one engine, replay the workload, write a JSON of what happened.

    python -m bench.worker --arm vllm|raw|engine|app --dtype nvfp4|bf16|mtp --settings JSON --prompts FILE \
        --out FILE [...]

Arms, all on the same EngineSettings:
  vllm    plain vLLM: AsyncLLM from engine.vllm_launch with patched=False (none of the app's patches or kernels),
          token-id prompts, SamplingParams as VllmEngine builds them plus ignore_eos
  raw     the same, patched: the engine exactly as the app launches it
  engine  engine.vllm_backend.VllmEngine through the Engine protocol (chat messages in, Deltas out)
  app     `python app.py` in a process of its own, through its Gradio API with gradio_client

The driver (`python -m bench`) starts one worker per configuration; progress lines start with "[bench]".
The result file is rewritten after every step, so a worker stopped by a time limit leaves what it measured.
"""

from __future__ import annotations

PROCESS_START = __import__("time").time()  # as early as this process can stamp it

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from contextlib import aclosing  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench import options  # noqa: E402
from bench.workload import Prompt, PromptSet, RequestResult, Run, Workload, summarize_run  # noqa: E402
from engine.gpu import visible_gpu  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_TAG = "worker"


def say(message: str) -> None:
    print(f"[bench] {_TAG}: {message}", flush=True)


# ------------------------------------------------------------------------------------------- GPU facts


def gpu_memory() -> dict[str, Any]:
    """Device-wide used/total memory through NVML (no CUDA context needed, so safe before vLLM forks)."""
    try:
        import pynvml

        handle = visible_gpu()
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "used_gib": info.used / 2**30,
            "total_gib": info.total / 2**30,
        }
    except Exception as e:  # no driver (CPU machine): nothing to report
        return {"name": None, "used_gib": None, "total_gib": None, "error": f"{type(e).__name__}: {e}"}


def versions() -> dict[str, str | None]:
    out = {}
    for package in ("vllm", "torch", "transformers", "gradio", "gradio_client", "tokenizers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


# ------------------------------------------------------------------------------------------------ arms


def greedy_options(max_tokens: int):
    """Greedy, and exactly `max_tokens` long: every arm gets the same work."""
    from engine.base import SamplingOptions

    return SamplingOptions(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


class RawArm:
    """AsyncLLM as engine.vllm_launch builds it for the app (patched) or without the app's patches (the vllm arm:
    plain vLLM with the same engine arguments); none of the Engine layer."""

    def __init__(self, settings, *, patched: bool):
        self.settings = settings
        self.patched = patched
        self.notes: list[str] = []
        self.info: dict[str, Any] = {}
        self.start_origin: float | None = None  # None: the worker's own start

    async def start(self) -> None:
        from engine.vllm_launch import launch

        launched = await launch(self.settings, patched=self.patched, notes=self.notes)
        self.llm = launched.llm
        self.info["patched"] = self.patched
        args = sorted(vars(launched.args).items())
        self.info["engine_args"] = {k: repr(v) for k, v in args if v not in (None, {}, [])}
        self.info["max_model_len"] = self.llm.model_config.max_model_len

    async def prepare(self, n: int) -> None:
        pass

    async def request(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        from engine.vllm_backend import request_metrics, sampling_params

        params = sampling_params(greedy_options(max_tokens))
        submitted = time.perf_counter()
        first = last = final = None
        tokens = first_tokens = chunks = 0
        try:
            stream = self.llm.generate({"prompt_token_ids": list(prompt.token_ids)}, params, uuid.uuid4().hex)
            async with aclosing(stream):
                async for out in stream:
                    now = time.perf_counter()
                    k = len(out.outputs[0].token_ids)
                    if k:
                        if first is None:
                            first, first_tokens = now, k
                        last, tokens, chunks = now, tokens + k, chunks + 1
                    final = out
        except Exception as e:
            return RequestResult(
                len(prompt.token_ids), tokens, submitted, first, last, error=f"{type(e).__name__}: {e}"
            )
        prompt_tokens = len(final.prompt_token_ids or ()) if final is not None else None
        engine_ttft = engine_rate = None
        try:
            m = request_metrics(final.metrics, prompt_tokens or 0)
            engine_ttft, engine_rate = m.ttft_s, m.decode_tok_s
        except Exception:  # stats off or a different vLLM: the client's clock still counts
            pass
        return RequestResult(
            prompt_tokens=prompt_tokens,
            output_tokens=tokens,
            submitted=submitted,
            first=first,
            last=last,
            first_chunk_tokens=max(first_tokens, 1),
            chunks=chunks,
            engine_ttft_s=engine_ttft,
            engine_decode_tok_s=engine_rate,
            finish_reason=final.outputs[0].finish_reason if final is not None else None,
        )

    async def stop(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()


class EngineArm:
    """engine.vllm_backend.VllmEngine: the app's engine layer without the UI."""

    def __init__(self, settings):
        self.settings = settings
        self.notes: list[str] = []
        self.info: dict[str, Any] = {}
        self.start_origin: float | None = None

    async def start(self) -> None:
        from engine.vllm_backend import VllmEngine

        self.engine = VllmEngine(self.settings)
        self.notes = self.engine.notes
        await self.engine.start()
        self.info["max_model_len"] = self.engine.max_model_len
        self.info["ignore_eos"] = getattr(greedy_options(1), "ignore_eos", None)

    async def prepare(self, n: int) -> None:
        pass

    async def request(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        from engine.base import GenerationRequest

        request = GenerationRequest(
            messages=[{"role": "user", "content": prompt.text}],
            sampling=greedy_options(max_tokens),
            enable_thinking=False,
        )
        submitted = time.perf_counter()
        first = last = final = None
        tokens = first_tokens = chunks = 0
        try:
            async with aclosing(self.engine.generate(request)) as stream:
                async for delta in stream:
                    now = time.perf_counter()
                    k = delta.metrics.output_tokens - tokens
                    if k > 0:
                        if first is None:
                            first, first_tokens = now, k
                        last, tokens, chunks = now, delta.metrics.output_tokens, chunks + 1
                    final = delta
        except Exception as e:
            return RequestResult(prompt.text_tokens, tokens, submitted, first, last, error=f"{type(e).__name__}: {e}")
        m = final.metrics if final is not None else None
        return RequestResult(
            prompt_tokens=m.prompt_tokens if m else None,
            output_tokens=tokens,
            submitted=submitted,
            first=first,
            last=last,
            first_chunk_tokens=max(first_tokens, 1),
            chunks=chunks,
            engine_ttft_s=m.ttft_s if m else None,
            engine_decode_tok_s=m.decode_tok_s if m else None,
            finish_reason=final.finish_reason if final is not None else None,
            error="the stream ended with an error" if final is not None and final.finish_reason == "error" else None,
        )

    async def stop(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()


class AppArm:
    """The whole app: app.py with the same engine settings, driven through gradio_client."""

    def __init__(self, settings, *, log_path: Path, ready_timeout_s: float, extra_args: list[str]):
        self.settings = settings
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = extra_args
        self.notes: list[str] = []
        self.info: dict[str, Any] = {}
        self.start_origin: float | None = None
        self.app = None
        self.sessions: list = []

    async def start(self) -> None:
        from bench.app_client import AppClient, AppProcess, free_port, wait_until_ready

        port = free_port()
        cmd = options.app_command(
            self.settings, python=sys.executable, app=str(ROOT / "app.py"), port=port, extra=self.extra_args
        )
        self.info["app_command"] = cmd
        say("starting " + " ".join(cmd[1:]))
        env = {"GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        self.app = AppProcess(cmd, cwd=ROOT, log_path=self.log_path, env=env)
        self.start_origin = self.app.started
        url = f"http://127.0.0.1:{port}/"
        await asyncio.to_thread(wait_until_ready, url, self.app, timeout_s=self.ready_timeout_s)
        self.client = AppClient(url)
        first = await asyncio.to_thread(self.client.session)  # reads /chat's parameters once
        self.info["chat_endpoint"] = dataclasses.asdict(self.client.endpoint)
        self.info["sessions_opened_before_the_clock"] = first.opened

    async def prepare(self, n: int) -> None:
        self.sessions = list(await asyncio.gather(*(asyncio.to_thread(self.client.session) for _ in range(n))))

    async def request(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        session = self.sessions.pop()
        return await asyncio.to_thread(self.client.request, session, prompt.text, max_tokens, prompt.text_tokens)

    async def stop(self) -> None:
        if self.app is not None:
            rc = await asyncio.to_thread(self.app.stop)
            self.info["app_exit_code"] = rc


# ---------------------------------------------------------------------------------------------- driver


def estimate_run_s(run: Run) -> float:
    """A generous guess of one run's duration (prefill ~10k tok/s, decode ~150 tok/s a stream)."""
    return 1.0 + run.streams * run.prompt_len / 10_000 + run.output_len / 150


class Worker:
    def __init__(self, ns: argparse.Namespace):
        self.ns = ns
        self.out = Path(ns.out)
        self.workload: Workload = options.workload_from(ns)
        self.settings = EngineSettings.from_json(ns.settings)
        if ns.arm in ("vllm", "raw"):
            self.arm = RawArm(self.settings, patched=ns.arm == "raw")
        elif ns.arm == "engine":
            self.arm = EngineArm(self.settings)
        else:
            self.arm = AppArm(
                self.settings,
                log_path=Path(ns.app_log or self.out.with_suffix(".app.log")),
                ready_timeout_s=ns.app_ready_timeout,
                extra_args=list(ns.app_arg),
            )
        self.result: dict[str, Any] = {
            "arm": ns.arm,
            "dtype": ns.dtype,
            "name": ns.name or f"{ns.arm}-{ns.dtype}",
            "start_only": ns.start_only,
            "model": self.settings.model,
            "dummy": self.settings.load_format == "dummy",
            "settings": dataclasses.asdict(self.settings),
            "workload": self.workload.to_dict(),
            "argv": sys.argv,
            "versions": versions(),
            "cache": ns.cache_state,
            "status": "starting",
            "errors": [],
            "skipped": [],
            "runs": [],
            "ttft_probe": {},
        }

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out)

    async def batch(self, prompts: list[Prompt], max_tokens: int) -> list[RequestResult]:
        await self.arm.prepare(len(prompts))
        return list(await asyncio.gather(*(self.arm.request(p, max_tokens) for p in prompts)))

    async def main(self) -> int:
        spawned = self.ns.spawn_time or PROCESS_START
        self.save()
        say(f"starting the engine ({self.ns.cache_state} compile cache)")
        try:
            await self.arm.start()
        except BaseException as e:
            self.result["status"] = "failed to start"
            self.result["errors"].append(f"start: {type(e).__name__}: {e}\n{traceback.format_exc()[-4000:]}")
            self.result["notes"] = self.arm.notes
            self.save()
            say(f"FAILED to start: {type(e).__name__}: {str(e)[:500]}")
            await self._stop()
            return 1
        ready = time.time()
        origin = self.arm.start_origin or spawned
        self.result["start"] = {
            "seconds": ready - origin,
            "origin_wall": origin,
            "ready_wall": ready,
            "cache": self.ns.cache_state,
            "from": "app.py process start" if self.arm.start_origin else "worker process start",
            "worker_imports_s": PROCESS_START - spawned if self.ns.spawn_time else None,
        }
        self.result["gpu_memory"] = gpu_memory()
        if self.arm.start_origin is None:  # the engine started in this process: its timeline is ours
            from engine import timeline

            self.result["startup"] = timeline.marks()
        self.result["notes"] = list(self.arm.notes)
        self.result["info"] = self.arm.info
        self.result["status"] = "ready"
        self.save()
        mem = self.result["gpu_memory"]
        used = f"{mem['used_gib']:.1f}/{mem['total_gib']:.1f} GiB" if mem.get("used_gib") is not None else "n/a"
        say(f"engine ready in {ready - origin:.1f} s; GPU memory {used}; notes: {self.arm.notes}")
        try:
            if not self.ns.start_only:
                await self.measure()
            self.result["status"] = "done"
        except BaseException as e:
            self.result["status"] = "failed"
            self.result["errors"].append(f"measure: {type(e).__name__}: {e}\n{traceback.format_exc()[-4000:]}")
            say(f"FAILED: {type(e).__name__}: {str(e)[:500]}")
        finally:
            self.result["gpu_memory_after"] = gpu_memory()
            self.save()
            await self._stop()
        return 0 if self.result["status"] == "done" else 1

    async def _stop(self) -> None:
        try:
            await asyncio.wait_for(self.arm.stop(), timeout=60)
        except BaseException as e:
            self.result["errors"].append(f"stop: {type(e).__name__}: {e}")
            self.save()

    def _time_left(self, needed_s: float) -> bool:
        return not self.ns.deadline or time.time() + needed_s < self.ns.deadline

    async def measure(self) -> None:
        w = self.workload
        prompts = PromptSet.load(self.ns.prompts)
        t = time.perf_counter()
        for prompt_len, streams in w.warmups():
            results = await self.batch([prompts.take(prompt_len) for _ in range(streams)], w.warmup_output_len)
            for r in results:
                if r.error:
                    raise RuntimeError(f"warm-up request failed: {r.error}")
        self.result["warmup_s"] = time.perf_counter() - t
        say(f"warmed up in {self.result['warmup_s']:.1f} s")
        if getattr(self.arm, "app", None) is not None:
            self.arm.app.mark(f"{_TAG}: warmed up")

        for prompt_len in w.prompt_lens:
            samples = []
            for _ in range(w.ttft_samples):
                prompt = prompts.take(prompt_len)
                if not self._time_left(2 + prompt_len / 5000):
                    self.result["skipped"].append(f"ttft p{prompt_len}")
                    continue
                (r,) = await self.batch([prompt], w.ttft_output_len)
                samples.append(r.to_dict())
            self.result["ttft_probe"][str(prompt_len)] = samples
            ttfts = sorted(s["ttft_s"] * 1000 for s in samples if s["ttft_s"] is not None)
            if ttfts:
                say(f"TTFT p{prompt_len}: {', '.join(f'{x:.0f}' for x in ttfts)} ms")
            self.save()

        for run in w.runs():
            batch = [prompts.take(run.prompt_len) for _ in range(run.streams)]  # taken even if skipped: same prompts
            if not self._time_left(estimate_run_s(run)):
                self.result["skipped"].append(run.key)
                say(f"{run.key}: skipped (time budget)")
                continue
            summary = summarize_run(run, await self.batch(batch, run.output_len))
            self.result["runs"].append(summary)
            self.save()
            say(describe_run(summary))

    # -------------------------------------------------------------------------------------------------


def describe_run(s: dict[str, Any]) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    ttfts = [t for t in s["ttft_ms"] if t is not None]
    ttft = fmt(sorted(ttfts)[len(ttfts) // 2] if ttfts else None, ".0f")
    extra = f"; {len(s['errors'])} errors: {s['errors'][0][:200]}" if s["errors"] else ""
    short = f"; {s['short_outputs']} short outputs {s['output_tokens']}" if s["short_outputs"] else ""
    lap = "" if s["overlapped"] in (None, True) else "; streams did NOT overlap"
    return (
        f"{s['key']}: TTFT {ttft} ms, decode {fmt(s['decode_tok_s_mean'], '.1f')} tok/s a stream, "
        f"aggregate {fmt(s['aggregate_tok_s'], '.1f')} tok/s{short}{lap}{extra}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.splitlines()[0])
    p.add_argument("--arm", choices=options.ARMS, required=True)
    p.add_argument("--dtype", choices=options.DTYPES, required=True)
    p.add_argument("--settings", required=True, help="the configuration's EngineSettings as JSON (the driver's)")
    p.add_argument("--prompts", type=Path, help="prompts.json written by the driver (not needed with --start-only)")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--name", help="this configuration's name in the results")
    p.add_argument("--start-only", action="store_true", help="start the engine, record the time, stop")
    p.add_argument("--spawn-time", type=float, help="wall time at which the driver started this process")
    p.add_argument("--deadline", type=float, help="wall time after which no new run starts")
    p.add_argument("--cache-state", default="unknown", choices=("cold", "warm", "unknown"))
    p.add_argument("--app-log", type=Path, help="where app.py's output goes (app arm)")
    p.add_argument("--app-ready-timeout", type=float, default=900.0)
    p.add_argument("--app-arg", action="append", default=[], help="extra app.py argument (repeatable)")
    options.add_workload_flags(p)
    ns = p.parse_args(argv)
    if not ns.start_only and ns.prompts is None:
        p.error("--prompts is required unless --start-only")
    return ns


def main(argv: list[str] | None = None) -> int:
    global _TAG
    ns = parse_args(argv)
    _TAG = ns.name or f"{ns.arm}-{ns.dtype}"
    return asyncio.run(Worker(ns).main())


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # vLLM's background threads and processes are gone by now; don't wait on stray non-daemon threads.
    os._exit(code)
