"""`python -m bench`: one worker process per configuration, the same workload for each, one results file.

    python -m bench --dummy                       # full-size config, random weights: no checkpoint needed
    python -m bench --model DIR [--bf16-model DIR]
    python -m bench --dummy --dry-run             # the plan, the commands and a time estimate; no GPU

Configurations are (arm, dtype) pairs, run in the order given: arms vllm (plain vLLM's AsyncLLM, none of the app's
patches: the reference), raw (the same with the patches, as the app launches it), engine (the app's Engine
protocol) and app (the whole app through its Gradio API); dtypes nvfp4, bf16 and mtp. Each
worker starts its engine once, replays the same prompts (built here, once) and writes a JSON; this
merges them into <out>/<date>-<gpu>.json and .md after every worker, so a run cut short keeps what it has.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import options, report
from bench.workload import Workload
from engine import settings
from engine.gpu import visible_gpu

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = "vllm:nvfp4,raw:nvfp4,engine:nvfp4,app:nvfp4,raw:bf16"
# Rough costs on an H100/H200, for the dry-run estimate and the time budget (see NOTES.md). Seen on an H200
# (2026-11-28, full-size config, four lanes starting at once): NVFP4 186 s cold / 84 s warm, NVFP4 with the MTP
# drafter 221 s / 91 s; BF16 not yet measured (the kit saw 75-140 s for either).
START_S = {
    ("nvfp4", "cold"): 190.0,
    ("nvfp4", "warm"): 85.0,
    ("bf16", "cold"): 190.0,
    ("bf16", "warm"): 90.0,
    ("mtp", "cold"): 220.0,
    ("mtp", "warm"): 95.0,
}
APP_START_EXTRA_S = 15.0  # gradio import, server, readiness polling
STOP_S = 10.0
WORKER = [sys.executable, "-m", "bench.worker"]  # tests swap in a worker with a fake engine


@dataclass
class WorkerPlan:
    order: int
    arm: str
    dtype: str
    name: str
    model: str
    cache_state: str  # what the compile cache should hold for this start
    start_only: bool = False
    cmd: list[str] = field(default_factory=list)
    result_path: Path | None = None
    log_path: Path | None = None
    app_log_path: Path | None = None


# ------------------------------------------------------------------------------------------------ CLI


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_configs(text: str) -> list[tuple[str, str]]:
    configs = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        arm, sep, dtype = item.partition(":")
        if not sep or arm not in options.ARMS or dtype not in options.DTYPES:
            raise argparse.ArgumentTypeError(
                f"expected ARM:DTYPE items (arms {', '.join(options.ARMS)}; dtypes {', '.join(options.DTYPES)}), "
                f"got {item!r}"
            )
        if (arm, dtype) not in configs:
            configs.append((arm, dtype))
    if not configs:
        raise argparse.ArgumentTypeError("no configuration given")
    return configs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--dummy", action="store_true", help="full-size Gemma 4 26B-A4B config with random weights")
    g.add_argument("--model", help="NVFP4 checkpoint folder (without --dummy)")
    g.add_argument("--bf16-model", help="BF16 checkpoint folder (without --dummy; bf16 configs are skipped without it)")
    g.add_argument(
        "--tokenizer-from",
        type=Path,
        help="--dummy: tiny Gemma 4 checkpoint lending the tokenizer "
        "(default: the tests' .tiny cache, built if missing)",
    )
    g.add_argument(
        "--no-widen-tokenizer",
        action="store_true",
        help="--dummy: keep the tiny 1,024-token vocabulary (random ids then decode to empty text)",
    )
    g.add_argument(
        "--configs",
        type=parse_configs,
        default=DEFAULT_CONFIGS,
        metavar="ARM:DTYPE,...",
        help="configurations in run order",
    )
    g.add_argument(
        "--arms", type=options.name_list(options.ARMS), help="with --dtypes: run every arm × dtype instead of --configs"
    )
    g.add_argument("--dtypes", type=options.name_list(options.DTYPES), help="see --arms")
    options.add_workload_flags(p)
    options.add_engine_flags(p)
    g = p.add_argument_group("process")
    g.add_argument("--app-arg", action="append", default=[], help="extra app.py argument (repeatable)")
    g.add_argument(
        "--start-times",
        action="store_true",
        help="also restart the engine of each dtype that has only one configuration, to time a start "
        "with a warm compile cache (costs one more engine start per such dtype)",
    )
    g.add_argument(
        "--compile-cache",
        type=Path,
        help="folder for vLLM's compile cache (VLLM_CACHE_ROOT=DIR/vllm) and the --dummy checkpoints "
        "(default: a new temp folder, so the first start of each dtype is cold); reuse one to skip compiling",
    )
    g.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    g.add_argument("--logs", type=Path, help="worker logs, prompts and raw worker JSON (default: a temp folder)")
    g.add_argument(
        "--time-budget",
        type=float,
        help="seconds for the whole bench: no engine starts or run begins "
        "that would not end in time, and the results are written before it runs out",
    )
    g.add_argument("--worker-timeout", type=float, default=900.0, help="seconds before a worker is killed")
    g.add_argument("--app-ready-timeout", type=float, default=600.0)
    g.add_argument("--peak-bandwidth-tbs", type=float, help="override the GPU's peak memory bandwidth (TB/s)")
    g.add_argument("--tag", default="", help="added to the results file name")
    g.add_argument(
        "--append",
        action="store_true",
        help="add to the newest results file of today, this GPU and --tag in --out (configurations of the "
        "same name are replaced): split a matrix over several calls of a time-limited machine",
    )
    g.add_argument("--dry-run", action="store_true", help="print the plan, commands and estimate; start nothing")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.arms or ns.dtypes:
        arms, dtypes = ns.arms or options.ARMS, ns.dtypes or ("nvfp4", "bf16")
        ns.configs = [(a, d) for d in dtypes for a in arms]
    if not ns.dummy and not ns.model and not ns.bf16_model:
        p.error("give --dummy, or --model DIR (and --bf16-model DIR for the bf16 configurations)")
    if ns.dummy and (ns.model or ns.bf16_model):
        p.error("--dummy writes its own full-size folders: leave out --model/--bf16-model")
    if max(ns.prompt_lens) + max(ns.output_lens) > ns.max_model_len:
        p.error(f"--max-model-len {ns.max_model_len} is shorter than the longest prompt + output")
    return ns


# ------------------------------------------------------------------------------------------- planning


def compile_key(arm: str, dtype: str) -> str:
    """Which compiled graphs a configuration needs: the vllm arm's graphs lack the patched kernels."""
    return f"{dtype}_plain" if arm == "vllm" else dtype


def plan_workers(ns: argparse.Namespace, models: dict[str, str], cache_marked: set[str]) -> list[WorkerPlan]:
    """Workers in run order; the first start of each dtype in an empty cache is cold, later ones warm."""
    plans: list[WorkerPlan] = []
    seen: set[str] = set(cache_marked)
    counts = {d: sum(1 for _, dd in ns.configs if dd == d) for d in options.DTYPES}
    for arm, dtype in ns.configs:
        if dtype not in models:
            continue
        state = "warm" if compile_key(arm, dtype) in seen else "cold"
        seen.add(compile_key(arm, dtype))
        plans.append(WorkerPlan(len(plans), arm, dtype, f"{arm}-{dtype}", models[dtype], state))
        if ns.start_times and counts[dtype] == 1 and state == "cold":
            plans.append(WorkerPlan(len(plans), arm, dtype, f"{arm}-{dtype}-restart", models[dtype], "warm", True))
    return plans


def worker_command(ns: argparse.Namespace, plan: WorkerPlan, prompts: Path, logs: Path) -> list[str]:
    plan.result_path = logs / f"{plan.order:02d}-{plan.name}.json"
    plan.log_path = logs / f"{plan.order:02d}-{plan.name}.log"
    config = options.engine_settings(ns, model=plan.model, load_format=load_format(ns), dtype=plan.dtype)
    cmd = [
        *WORKER,
        "--arm", plan.arm, "--dtype", plan.dtype, "--settings", config.to_json(),
        "--name", plan.name, "--out", str(plan.result_path), "--cache-state", plan.cache_state,
    ]  # fmt: skip
    if plan.start_only:
        cmd.append("--start-only")
    else:
        cmd += ["--prompts", str(prompts)]
    if plan.arm == "app":
        plan.app_log_path = logs / f"{plan.order:02d}-{plan.name}.app.log"
        cmd += ["--app-log", str(plan.app_log_path), "--app-ready-timeout", str(ns.app_ready_timeout)]
        for a in ns.app_arg:
            cmd += ["--app-arg", a]
    cmd += options.workload_args(options.workload_from(ns))
    plan.cmd = cmd
    return cmd


def load_format(ns: argparse.Namespace) -> str:
    return "dummy" if ns.dummy else "auto"


def engine_flags(ns: argparse.Namespace) -> list[str]:
    """The engine settings every configuration shares, as app.py's flags (drafting aside)."""
    return settings.to_argv(options.engine_settings(ns, model="", load_format=load_format(ns), dtype="nvfp4"))


def estimate_measure_s(w: Workload) -> float:
    """Warm-up, TTFT probe and runs at ~10k prefill tok/s and ~200 (one stream) / ~150 (several) decode tok/s."""
    total = 3.0 + sum(streams * (0.3 + p / 10_000) for p, streams in w.warmups())
    total += sum(w.ttft_samples * (0.1 + p / 10_000 + w.ttft_output_len / 200) for p in w.prompt_lens)
    for run in w.runs():
        total += 0.5 + run.streams * run.prompt_len / 10_000 + run.output_len / (200 if run.streams == 1 else 150)
    return total


def estimate_worker_s(plan: WorkerPlan, w: Workload) -> float:
    start = START_S[(plan.dtype, plan.cache_state if plan.cache_state != "unknown" else "cold")]
    if plan.arm == "app":
        start += APP_START_EXTRA_S
    return start + STOP_S + (0 if plan.start_only else estimate_measure_s(w) * (1.15 if plan.arm == "app" else 1))


# ---------------------------------------------------------------------------------------- environment


def gpu_name() -> str | None:
    try:
        import pynvml

        name = pynvml.nvmlDeviceGetName(visible_gpu())
        return name.decode() if isinstance(name, bytes) else name
    except Exception:
        return None


def gpu_used_fraction() -> float | None:
    try:
        import pynvml

        info = pynvml.nvmlDeviceGetMemoryInfo(visible_gpu())
        return info.used / info.total
    except Exception:
        return None


def wait_for_free_gpu(timeout_s: float = 60.0, threshold: float = 0.1) -> float | None:
    """Wait until the previous worker's memory is given back (vLLM refuses to start short of it)."""
    deadline = time.time() + timeout_s
    used = gpu_used_fraction()
    while used is not None and used > threshold and time.time() < deadline:
        time.sleep(1.0)
        used = gpu_used_fraction()
    return used


def app_flags_missing(cmd: list[str]) -> list[str]:
    """Flags the app arm passes that `app.py --help` does not list (checked before any GPU time is spent)."""
    try:
        out = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"(app.py --help failed: {e})"]
    if out.returncode != 0:
        return [f"(app.py --help exited {out.returncode}: {out.stderr.strip()[-300:]})"]
    return [f for f in options.app_flags_needed(cmd) if not re.search(re.escape(f) + r"(?![\w-])", out.stdout)]


def worker_env(cache_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "VLLM_CACHE_ROOT": str(cache_root / "vllm"),
            "TRITON_CACHE_DIR": str(cache_root / "triton"),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# -------------------------------------------------------------------------------------------- running


def run_worker(plan: WorkerPlan, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run one worker; echo its "[bench]" lines, keep all of its output in its log; return its result."""
    started = time.time()
    with open(plan.log_path, "w") as log:
        log.write(" ".join(plan.cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(
            [*plan.cmd, "--spawn-time", repr(started)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
            errors="replace",
            bufsize=1,
        )

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                if line.startswith("[bench]"):
                    print(line.rstrip(), flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            print(f"[bench] {plan.name}: no end after {timeout_s:.0f} s: stopping it", flush=True)
            _kill_group(proc, signal.SIGINT, 15)
        _kill_group(proc, signal.SIGKILL, 5)  # whatever the worker left behind (vLLM's engine core)
        reader.join(timeout=5)
    result = _read_result(plan)
    result.setdefault("errors", [])
    if timed_out:
        result["errors"].append(f"killed after {timeout_s:.0f} s")
        result["status"] = "timed out"
    elif proc.returncode and result.get("status") in (None, "starting", "no result"):
        result["errors"] = [f"worker exited with {proc.returncode}: {_tail(plan.log_path)}"]
        result["status"] = "crashed"
    texts = [_read(plan.log_path)] + ([_read(plan.app_log_path)] if plan.app_log_path else [])
    result["log_facts"] = report.log_facts("\n".join(texts))
    origin = (result.get("start") or {}).get("origin_wall")
    # The engine's own timeline (engine.timeline: the worker's marks, or the app's log lines for the app arm);
    # vLLM's log lines (to the second) where neither has one.
    result["timeline"] = result.get("startup") or report.startup_marks(texts[-1])
    if not result["timeline"]:
        result["timeline"] = report.timeline(texts[-1], origin)
        if result["timeline"] and result.get("start"):
            result["timeline"]["ready"] = round(result["start"]["seconds"], 1)
    result["wall_s"] = time.time() - started
    result["order"] = plan.order
    result["log"] = str(plan.log_path)
    return result


def _kill_group(proc: subprocess.Popen, sig: int, wait_s: float) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass


def _read(path: Path | None) -> str:
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


def _tail(path: Path, chars: int = 1500) -> str:
    return _read(path)[-chars:]


def _read_result(plan: WorkerPlan) -> dict[str, Any]:
    base = {"arm": plan.arm, "dtype": plan.dtype, "name": plan.name, "start_only": plan.start_only,
            "cache": plan.cache_state}  # fmt: skip
    try:
        return {**base, **json.loads(plan.result_path.read_text())}
    except (OSError, json.JSONDecodeError, TypeError):
        return {**base, "status": "no result", "errors": [f"no result file; log tail: {_tail(plan.log_path)}"]}


def results_paths(out: Path, date: str, slug: str, tag: str) -> tuple[Path, Path]:
    stem = f"{date}-{slug}" + (f"-{tag}" if tag else "")
    path, n = out / f"{stem}.json", 2
    while path.exists():
        path, n = out / f"{stem}-{n}.json", n + 1
    return path, path.with_suffix(".md")


def newest_results(out: Path, date: str, slug: str, tag: str) -> Path | None:
    stem = f"{date}-{slug}" + (f"-{tag}" if tag else "")
    found = [p for p in Path(out).glob(f"{stem}*.json") if re.fullmatch(re.escape(stem) + r"(-\d+)?\.json", p.name)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def write_results(path: Path, md_path: Path, results: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)
    table = report.markdown(results)
    md_path.write_text(table)
    return table


def prepare_models(ns: argparse.Namespace, work: Path) -> dict[str, str]:
    dtypes = {d for _, d in ns.configs}
    if ns.dummy:
        from bench import dummy

        models = {
            d: str(dummy.prepare(work / "checkpoints", nvfp4=d != "bf16", tokenizer_from=ns.tokenizer_from,
                                 widen=not ns.no_widen_tokenizer))
            for d in sorted(dtypes)
        }  # fmt: skip
        if "mtp" in models and not ns.draft_model:
            from bench.checkpoints import write_assistant_checkpoint

            ns.draft_model = str(
                write_assistant_checkpoint(work / "checkpoints" / "assistant", target=Path(models["mtp"]))
            )
        return models
    models = {}
    if ns.model and "nvfp4" in dtypes:
        models["nvfp4"] = ns.model
    if ns.model and ns.draft_model and "mtp" in dtypes:
        models["mtp"] = ns.model
    if ns.bf16_model and "bf16" in dtypes:
        models["bf16"] = ns.bf16_model
    return models


def build_prompt_file(model_dir: str, w: Workload, path: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench.workload import build_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t = time.time()
    prompts = build_prompts(tokenizer, w.prompt_requests())
    prompts.save(path)
    spread = {p: [min(x.text_tokens for x in v), max(x.text_tokens for x in v)] for p, v in prompts.prompts.items()}
    return {"prompts": sum(len(v) for v in prompts.prompts.values()), "text_tokens": spread, "seconds": time.time() - t}


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    t0 = time.time()
    deadline = t0 + ns.time_budget if ns.time_budget else None
    w = options.workload_from(ns)
    date = datetime.date.today().isoformat()
    name = gpu_name()
    slug = report.gpu_slug(name)
    logs = ns.logs or Path(tempfile.mkdtemp(prefix=f"bench-{date}-"))
    logs.mkdir(parents=True, exist_ok=True)
    cache_root = ns.compile_cache or Path(tempfile.mkdtemp(prefix="bench-cache-"))  # not under --logs: it is big
    cache_root.mkdir(parents=True, exist_ok=True)
    settings_key = hashlib.sha256(" ".join(engine_flags(ns)).encode()).hexdigest()[:12]
    marked = {p.name.split("-")[1] for p in cache_root.glob(f"started-*-{settings_key}")}  # started-KEY-SETTINGS

    models = prepare_models(ns, cache_root)
    skipped_dtypes = sorted({d for _, d in ns.configs} - set(models))
    if skipped_dtypes:
        print(f"[bench] no checkpoint for {', '.join(skipped_dtypes)}: those configurations are skipped", flush=True)
    plans = plan_workers(ns, models, marked)
    prompts_path = logs / "prompts.json"
    for plan in plans:
        worker_command(ns, plan, prompts_path, logs)
    env = worker_env(cache_root)

    app_problem = None
    app_plans = [p for p in plans if p.arm == "app"]
    if app_plans:
        from bench.app_client import free_port

        config = options.engine_settings(
            ns, model=app_plans[0].model, load_format=load_format(ns), dtype=app_plans[0].dtype
        )
        probe = options.app_command(config, python=sys.executable, app="app.py", port=free_port(), extra=ns.app_arg)
        missing = app_flags_missing(probe)
        if missing:
            app_problem = f"app.py does not take {' '.join(missing)}: the app arm is skipped"
            print(f"[bench] {app_problem}", flush=True)

    prompt_info = build_prompt_file(next(iter(models.values())), w, prompts_path) if models else {}
    if prompt_info:
        print(f"[bench] {prompt_info['prompts']} prompts in {prompt_info['seconds']:.1f} s; chat-template token "
              f"counts per target: {prompt_info['text_tokens']}", flush=True)  # fmt: skip

    model_config = json.loads((Path(next(iter(models.values()))) / "config.json").read_text()) if models else None
    estimate = sum(estimate_worker_s(p, w) for p in plans if not (app_problem and p.arm == "app"))
    print(f"[bench] {len(plans)} workers on {name or 'no GPU'}; estimated {estimate / 60:.1f} min "
          f"(cold start ~{START_S[('nvfp4', 'cold')]:.0f} s, warm ~{START_S[('nvfp4', 'warm')]:.0f} s); logs in {logs}",
          flush=True)  # fmt: skip
    for plan in plans:
        print(f"[bench]   {plan.name} ({plan.cache_state} start, ~{estimate_worker_s(plan, w):.0f} s): "
              f"{' '.join(plan.cmd)}", flush=True)  # fmt: skip
    if ns.dry_run:
        return 0

    meta = {
        "date": date,
        "gpu": name,
        "gpu_slug": slug,
        "vllm_version": _version("vllm"),
        "versions": {p: _version(p) for p in ("vllm", "torch", "transformers", "gradio", "gradio_client")},
        "dummy": ns.dummy,
        "models": models,
        "mtp_acceptance": list(ns.mtp_acceptance) if "mtp" in models else None,
        "workload": w.to_dict(),
        "engine_flags": engine_flags(ns),
        "peak_bandwidth_tb_s": ns.peak_bandwidth_tbs,
        "command": sys.argv,
        "compile_cache": str(cache_root),
        "prompts": prompt_info,
        "app_problem": app_problem,
    }
    path, md_path = results_paths(ns.out, date, slug, ns.tag)
    finished: list[dict[str, Any]] = []
    earlier: list[dict[str, Any]] = []
    if ns.append:
        found = newest_results(ns.out, date, slug, ns.tag)
        if found is not None:
            path, md_path = found, found.with_suffix(".md")
            previous = json.loads(found.read_text())
            names = {p.name for p in plans}
            earlier = [c for c in previous.get("workers", []) if c.get("name") not in names]
            if previous.get("workload") != json.loads(json.dumps(w.to_dict())):
                print(f"[bench] warning: {found.name} was measured with another workload", flush=True)
            print(f"[bench] appending to {found} ({len(earlier)} configurations kept)", flush=True)
    first = max((c.get("order", 0) for c in earlier), default=-1) + 1
    for plan in plans:
        plan.order += first
    finished = list(earlier)
    for plan in plans:
        if app_problem and plan.arm == "app":
            finished.append({"arm": plan.arm, "dtype": plan.dtype, "name": plan.name, "order": plan.order,
                             "status": "skipped", "errors": [app_problem]})  # fmt: skip
            continue
        timeout = ns.worker_timeout
        if deadline is not None:
            left = deadline - time.time()
            smallest = Workload(prompt_lens=w.prompt_lens[:1], output_lens=w.output_lens[:1], concurrency=(1,),
                                ttft_samples=0)  # fmt: skip
            need = estimate_worker_s(plan, smallest)  # a start and at least one run
            if left < need:
                print(f"[bench] {plan.name}: skipped, {left:.0f} s left of the time budget", flush=True)
                finished.append({"arm": plan.arm, "dtype": plan.dtype, "name": plan.name, "order": plan.order,
                                 "status": "skipped", "errors": ["time budget"]})  # fmt: skip
                continue
            timeout = min(timeout, left - 15)
            plan.cmd += ["--deadline", repr(deadline - 25)]
        used = wait_for_free_gpu()
        if used is not None and used > 0.1:
            print(f"[bench] warning: {used:.0%} of GPU memory is still in use before {plan.name}", flush=True)
        print(f"[bench] {plan.name}: starting ({time.time() - t0:.0f} s into the bench)", flush=True)
        result = run_worker(plan, env, timeout)
        if result.get("start"):
            # this configuration's compile cache is warm
            (cache_root / f"started-{compile_key(plan.arm, plan.dtype)}-{settings_key}").touch()
        finished.append(result)
        results = report.build_results(meta, finished, model_config)
        write_results(path, md_path, results)
        print(f"[bench] {plan.name}: {result.get('status')} after {result['wall_s']:.0f} s", flush=True)
    results = report.build_results(meta, finished, model_config)
    results["bench_wall_s"] = time.time() - t0
    table = write_results(path, md_path, results)
    print("\n" + table, flush=True)
    print(f"[bench] wrote {path} and {md_path} in {time.time() - t0:.0f} s", flush=True)
    return 0 if all(r.get("status") == "done" for r in finished) else 1


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
