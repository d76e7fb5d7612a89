"""Merge the workers' results: headline numbers, app-vs-raw ratios, the results JSON and a Markdown table."""

from __future__ import annotations

import re
import time
from typing import Any

from bench import bandwidth, options
from bench.workload import headline_prompt_len, mean, percentile

REQUIRED_KEYS = (
    "gpu",
    "vllm_version",
    "nvfp4_decode_tok_s_bs1",
    "bf16_decode_tok_s_bs1",
    "app_vs_raw_tok_s",
    "app_vs_raw_ttft",
    "served_nvfp4_decode_tok_s_bs1",
    "vllm_reference_decode_tok_s_bs1",
)
ARM_ORDER = {"vllm": 0, "raw": 1, "engine": 2, "app": 3}

# Facts worth keeping from vLLM's log of each start.
LOG_FACTS = {
    "torch_compile_s": re.compile(r"torch\.compile took ([\d.]+) s in total"),
    "model_loading_gib": re.compile(r"Model loading took ([\d.]+) GiB"),
    "init_engine_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)"),
    "cuda_graphs_s": re.compile(r"Graph capturing finished in ([\d.]+) secs"),
    "kv_cache_tokens": re.compile(r"GPU KV cache size: ([\d,]+) tokens"),
    "attention_backend": re.compile(r"Using (\S+) attention backend"),
}
CACHE_HIT = re.compile(r"Directly load (?:the compiled graph|AOT compilation)")
WARMED_UP = re.compile(r"^\[bench\].*warmed up", re.M)
JIT = re.compile(r"Triton kernel JIT compilation during inference: (\w+)")
# vLLM's log lines: "INFO 11-28 06:12:17 [core.py:340] message"
LOG_LINE = re.compile(r"(?:DEBUG|INFO|WARNING|ERROR) (\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d+)? \[[^\]]*\] (.*)")
MILESTONES = {
    "core_start": "Initializing a V1 LLM engine",
    "weights_loaded": "Model loading took",
    "compiled": "torch.compile took",
    "kv_cache": "GPU KV cache size",
    "cuda_graphs": "Graph capturing finished",
    "core_ready": "init engine (profile",
}


def log_facts(text: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for key, pattern in LOG_FACTS.items():
        matches = pattern.findall(text)
        if matches:
            value = matches[-1]
            facts[key] = value if key == "attention_backend" else float(value.replace(",", ""))
    facts["compile_cache_hit"] = bool(CACHE_HIT.search(text)) if "torch.compile" in text or facts else None
    marker = WARMED_UP.search(text)
    facts["jit_during_warmup"] = sorted(set(JIT.findall(text[: marker.start()] if marker else text)))
    facts["jit_after_warmup"] = sorted(set(JIT.findall(text[marker.end() :]))) if marker else []
    return facts


def timeline(text: str, origin_wall: float | None) -> dict[str, float]:
    """Seconds from the engine's process start to each of vLLM's start-up milestones (1 s resolution)."""
    if not origin_wall:
        return {}
    year = time.localtime(origin_wall).tm_year
    out: dict[str, float] = {}
    for m in LOG_LINE.finditer(text):
        stamp, message = m.groups()
        for key, needle in MILESTONES.items():
            if key not in out and message.startswith(needle):
                try:
                    wall = time.mktime(time.strptime(f"{year}-{stamp}", "%Y-%m-%d %H:%M:%S"))
                except ValueError:
                    continue
                out[key] = round(wall - origin_wall, 1)
    return out


STARTUP_LINE = re.compile(r"start-up: (.+?) at ([\d.]+) s$", re.M)  # engine.timeline.LINE in the app's log


def startup_marks(text: str) -> dict[str, float]:
    """The app's own start-up timeline (engine.timeline), from its log: seconds from its process start."""
    marks: dict[str, float] = {}
    for name, seconds in STARTUP_LINE.findall(text):
        marks.setdefault(name, float(seconds))
    return marks


def gpu_slug(name: str | None) -> str:
    if not name:
        return "nogpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "gpu"


# ------------------------------------------------------------------------------------------- numbers


def _runs(config: dict[str, Any], prompt_len: int, output_len: int, streams: int) -> list[dict[str, Any]]:
    return [
        r
        for r in config.get("runs", [])
        if (r["prompt_len"], r["output_len"], r["streams"]) == (prompt_len, output_len, streams)
    ]


def bs1_ttft_samples(config: dict[str, Any], prompt_len: int, field: str = "ttft_s") -> list[float]:
    """One-stream TTFTs (ms) at a prompt length: the TTFT probe plus the one-stream runs."""
    out = [s[field] * 1000 for s in config.get("ttft_probe", {}).get(str(prompt_len), []) if s.get(field) is not None]
    for run in config.get("runs", []):
        if run["prompt_len"] == prompt_len and run["streams"] == 1:
            key = "ttft_ms" if field == "ttft_s" else "engine_ttft_ms"
            out += [t for t in run[key] if t is not None]
    return out


def ttft_table(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    lens = sorted({int(p) for p in config.get("ttft_probe", {})} | {r["prompt_len"] for r in config.get("runs", [])})
    table = {}
    for p in lens:
        client = bs1_ttft_samples(config, p)
        engine = bs1_ttft_samples(config, p, "engine_ttft_s")
        table[str(p)] = {
            "samples": len(client),
            "p50_ms": percentile(client, 50),
            "p95_ms": percentile(client, 95),
            "engine_p50_ms": percentile(engine, 50),
            "engine_p95_ms": percentile(engine, 95),
        }
    return table


def run_rows(config: dict[str, Any], model_config: dict[str, Any] | None, peak_tb_s: float | None) -> list[dict]:
    """One row per (prompt, output, streams), repeats averaged."""
    groups: dict[tuple[int, int, int], list[dict]] = {}
    for run in config.get("runs", []):
        groups.setdefault((run["prompt_len"], run["output_len"], run["streams"]), []).append(run)
    kv = config.get("settings", {}).get("kv_cache_dtype", "fp8")
    rows = []
    for (p, o, c), runs in sorted(groups.items()):
        ttft = [t for r in runs for t in r["ttft_ms"] if t is not None]
        engine_ttft = [t for r in runs for t in r["engine_ttft_ms"] if t is not None]
        decode = mean(r["decode_tok_s_mean"] for r in runs)
        tokens = [n for r in runs for n in r["output_tokens"]]
        bw = None
        if model_config is not None and decode:
            bw = bandwidth.fraction_of_peak(
                model_config,
                nvfp4=config["dtype"] != "bf16",
                aggregate_tok_s=decode * c,
                batch=c,
                context=p + o // 2,
                peak_tb_s=peak_tb_s,
                kv_cache_dtype=kv,
            )
        rows.append(
            {
                "arm": config["arm"],
                "dtype": config["dtype"],
                "prompt_len": p,
                "output_len": o,
                "streams": c,
                "ttft_p50_ms": percentile(ttft, 50),
                "ttft_p95_ms": percentile(ttft, 95),
                "engine_ttft_p50_ms": percentile(engine_ttft, 50),
                "decode_tok_s": decode,
                "engine_decode_tok_s": mean(x for r in runs for x in r["engine_decode_tok_s"]),
                "aggregate_tok_s": mean(r["aggregate_tok_s"] for r in runs),
                "bandwidth_fraction": bw,
                "output_tokens_min": min(tokens) if tokens else None,
                "output_tokens_max": max(tokens) if tokens else None,
                "prompt_tokens": sorted({n for r in runs for n in r["prompt_tokens"] if n is not None}),
                "errors": sum(len(r["errors"]) for r in runs),
                "overlapped": all(r["overlapped"] in (None, True) for r in runs),
                "timing": sorted({t for r in runs for t in r.get("timing", [])}),
            }
        )
    return rows


def _find(configs: list[dict], arm: str, dtype: str) -> dict | None:
    return next((c for c in configs if c["arm"] == arm and c["dtype"] == dtype and not c.get("start_only")), None)


def _headline_run(config: dict, prompt_lens: list[int], output_lens: list[int], streams: int = 1) -> dict | None:
    if not prompt_lens or not output_lens:
        return None
    runs = _runs(config, headline_prompt_len(prompt_lens), max(output_lens), streams)
    if not runs:
        return None
    return {
        "decode_tok_s": mean(r["decode_tok_s_mean"] for r in runs),
        "aggregate_tok_s": mean(r["aggregate_tok_s"] for r in runs),
    }


def sidebar_vs_client(config: dict[str, Any]) -> dict[str, Any]:
    """The app arm: what the sidebar showed for each one-stream request over what the bench's client measured.

    TTFT over every such request (the probe's too); decode tok/s over those of more than 100 tokens (a rate
    over a handful of tokens says little)."""
    ttft, decode = [], []
    requests = [s for samples in config.get("ttft_probe", {}).values() for s in samples]
    requests += [r for run in config.get("runs", []) if run["streams"] == 1 for r in run.get("requests_detail", [])]
    for r in requests:
        if r.get("ttft_s") and r.get("engine_ttft_s"):
            ttft.append(r["engine_ttft_s"] / r["ttft_s"])
        if r.get("output_tokens", 0) > 100 and r.get("decode_tok_s") and r.get("engine_decode_tok_s"):
            decode.append(r["engine_decode_tok_s"] / r["decode_tok_s"])
    return {
        "ttft_ratios": ttft,
        "decode_ratios": decode,
        "max_deviation": max((abs(x - 1) for x in ttft + decode), default=None),
    }


def headline(configs: list[dict], workload: dict[str, Any]) -> dict[str, Any]:
    """The issue's keys: one-stream decode per dtype (raw arm) and the Engine/app arms against raw."""
    prompt_lens, output_lens = list(workload["prompt_lens"]), list(workload["output_lens"])
    concurrency = max(workload["concurrency"])
    head_p = headline_prompt_len(prompt_lens) if prompt_lens else None
    out: dict[str, Any] = {
        "headline_run": {"prompt_len": head_p, "output_len": max(output_lens, default=None), "streams": 1},
    }
    for dtype in options.DTYPES:
        value, source = None, None
        for arm in ("raw", "engine", "app"):  # raw is the reference; the others only if raw has no number
            config = _find(configs, arm, dtype)
            h = _headline_run(config, prompt_lens, output_lens) if config else None
            if h and h["decode_tok_s"]:
                value, source = h["decode_tok_s"], arm
                break
        out[f"{dtype}_decode_tok_s_bs1"] = value
        out[f"{dtype}_decode_tok_s_bs1_arm"] = source
    out["mtp_vs_nvfp4_decode_bs1"] = _ratio(out["mtp_decode_tok_s_bs1"], out["nvfp4_decode_tok_s_bs1"])
    out.update(served_vs_reference(configs, prompt_lens, output_lens, concurrency, head_p))
    tok_s: dict[str, Any] = {}
    tok_s_many: dict[str, Any] = {}
    ttft: dict[str, Any] = {}
    dtype = "nvfp4" if _find(configs, "raw", "nvfp4") else "bf16"
    raw = _find(configs, "raw", dtype)
    if raw is not None:
        r1 = _headline_run(raw, prompt_lens, output_lens)
        rn = _headline_run(raw, prompt_lens, output_lens, concurrency)
        raw_ttft = percentile(bs1_ttft_samples(raw, head_p), 50) if head_p else None
        for arm in ("engine", "app"):
            config = _find(configs, arm, dtype)
            if config is None:
                continue
            a1 = _headline_run(config, prompt_lens, output_lens)
            an = _headline_run(config, prompt_lens, output_lens, concurrency)
            tok_s[arm] = _ratio(a1 and a1["decode_tok_s"], r1 and r1["decode_tok_s"])
            tok_s_many[arm] = _ratio(an and an["aggregate_tok_s"], rn and rn["aggregate_tok_s"])
            ttft[arm] = _ratio(percentile(bs1_ttft_samples(config, head_p), 50), raw_ttft)
    for d in (tok_s, tok_s_many, ttft):
        values = [v for v in d.values() if v is not None]
        d["min"] = min(values) if values else None
        d["max"] = max(values) if values else None
    out["app_vs_raw_dtype"] = dtype
    out["app_vs_raw_tok_s"] = tok_s  # arm decode tok/s / raw decode tok/s, one stream: below 1 = slower
    out["app_vs_raw_ttft"] = ttft  # arm TTFT p50 / raw TTFT p50, one stream: above 1 = slower
    out["app_vs_raw_aggregate_tok_s"] = tok_s_many  # at the largest concurrency
    app = next((c for d in options.DTYPES if (c := _find(configs, "app", d))), None)
    out["sidebar_vs_client"] = None if app is None else sidebar_vs_client(app)
    return out


def served_vs_reference(
    configs: list[dict], prompt_lens: list[int], output_lens: list[int], concurrency: int, head_p: int | None
) -> dict[str, Any]:
    """What the app serves by default (the app arm, NVFP4) against plain vLLM 0.26 (the vllm arm), same run."""
    numbers = {}
    for key, arm in (("served", "app"), ("vllm_reference", "vllm")):
        config = _find(configs, arm, "nvfp4")
        one = _headline_run(config, prompt_lens, output_lens) if config else None
        many = _headline_run(config, prompt_lens, output_lens, concurrency) if config else None
        ttft = percentile(bs1_ttft_samples(config, head_p), 50) if config and head_p else None
        numbers[key] = (one and one["decode_tok_s"], many and many["aggregate_tok_s"], ttft)
    (served, served_many, served_ttft), (ref, ref_many, ref_ttft) = numbers["served"], numbers["vllm_reference"]
    return {
        "served_nvfp4_decode_tok_s_bs1": served,
        "vllm_reference_decode_tok_s_bs1": ref,
        "served_vs_vllm_reference": {
            "decode_tok_s_bs1": _ratio(served, ref),  # above 1: the app decodes faster than plain vLLM
            "aggregate_tok_s": _ratio(served_many, ref_many),  # at the largest concurrency
            "ttft": _ratio(served_ttft, ref_ttft),  # below 1: the app answers sooner
        },
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def build_results(
    meta: dict[str, Any], configs: list[dict[str, Any]], model_config: dict[str, Any] | None
) -> dict[str, Any]:
    """The results JSON: meta, the bandwidth limit, headline keys, per-configuration tables, raw worker data."""
    gpu_name = meta.get("gpu") or next(
        (c.get("gpu_memory", {}).get("name") for c in configs if c.get("gpu_memory", {}).get("name")), None
    )
    vllm_version = meta.get("vllm_version") or next(
        (c.get("versions", {}).get("vllm") for c in configs if c.get("versions", {}).get("vllm")), None
    )
    limit = bandwidth.limit(model_config, gpu_name or "", meta.get("peak_bandwidth_tb_s")) if model_config else None
    peak = limit.peak_tb_s if limit else None
    ordered = sorted(configs, key=lambda c: c.get("order", 0))
    results: dict[str, Any] = {
        **meta,
        "gpu": gpu_name,
        "vllm_version": vllm_version,
        "bandwidth_limit": limit.to_dict() if limit else None,
        **headline(ordered, meta["workload"]),
        "configs": [],
    }
    for c in ordered:
        mem = c.get("gpu_memory") or {}
        results["configs"].append(
            {
                "name": c.get("name"),
                "arm": c["arm"],
                "dtype": c["dtype"],
                "status": c.get("status"),
                "start_only": c.get("start_only", False),
                "start_s": (c.get("start") or {}).get("seconds"),
                "start_cache": (c.get("start") or {}).get("cache", c.get("cache")),
                "start_from": (c.get("start") or {}).get("from"),
                "log_facts": c.get("log_facts", {}),
                "timeline": c.get("timeline", {}),
                "gpu_memory_used_gib": mem.get("used_gib"),
                "gpu_memory_total_gib": mem.get("total_gib"),
                "max_model_len": (c.get("info") or {}).get("max_model_len"),
                "notes": c.get("notes", []),
                "errors": c.get("errors", []),
                "skipped": c.get("skipped", []),
                "ttft": ttft_table(c),
                "rows": run_rows(c, model_config, peak),
            }
        )
    results["workers"] = ordered
    missing = [k for k in REQUIRED_KEYS if k not in results]
    assert not missing, missing
    return results


# ------------------------------------------------------------------------------------------ Markdown


def _f(value: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return format(value * scale, spec)


def _sidebar_line(agreement: dict[str, Any] | None) -> list[str]:
    if not agreement or agreement["max_deviation"] is None:
        return []

    def span(xs: list[float]) -> str:
        return f"×{min(xs):.3f}–×{max(xs):.3f} ({len(xs)} requests)" if xs else "no requests"

    return [
        f"**The app's sidebar against the bench's client (one stream):** TTFT {span(agreement['ttft_ratios'])}, "
        f"decode tok/s {span(agreement['decode_ratios'])}; largest deviation "
        f"{agreement['max_deviation'] * 100:.1f} %.",
        "",
    ]


def _served_line(results: dict[str, Any]) -> list[str]:
    served, ref = results.get("served_nvfp4_decode_tok_s_bs1"), results.get("vllm_reference_decode_tok_s_bs1")
    if not (served or ref):
        return []
    ratios = results.get("served_vs_vllm_reference") or {}
    return [
        f"**What the app serves against plain vLLM 0.26 (NVFP4, same run):** one stream {_f(served)} vs "
        f"{_f(ref)} tok/s (×{_f(ratios.get('decode_tok_s_bs1'), '.3f')}); aggregate at the most streams "
        f"×{_f(ratios.get('aggregate_tok_s'), '.3f')}; TTFT p50 ×{_f(ratios.get('ttft'), '.3f')}.",
        "",
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Benchmark {results.get('date', '')} · {results.get('gpu') or 'no GPU'}", ""]
    v = results.get("versions") or {}
    lines.append(
        f"vLLM {results.get('vllm_version') or '?'} · torch {v.get('torch') or '?'} · "
        f"{'dummy weights (full-size config)' if results.get('dummy') else 'real weights'} · "
        f"greedy · prompts {results['workload']['prompt_lens']} · outputs {results['workload']['output_lens']}"
    )
    lines.append("")
    limit = results.get("bandwidth_limit")
    if limit:
        lines.append(
            f"Bandwidth limit, one stream: NVFP4 {limit['nvfp4_bytes_per_token'] / 1e9:.2f} GB/token → "
            f"{_f(limit['nvfp4_limit_tok_s_bs1'], '.0f')} tok/s; BF16 {limit['bf16_bytes_per_token'] / 1e9:.2f} "
            f"GB/token → {_f(limit['bf16_limit_tok_s_bs1'], '.0f')} tok/s at {_f(limit['peak_tb_s'], '.2f')} TB/s "
            f"({limit['source']})."
        )
        lines.append("")
    h = results.get("headline_run", {})
    tok, ttft, agg = results["app_vs_raw_tok_s"], results["app_vs_raw_ttft"], results["app_vs_raw_aggregate_tok_s"]
    lines += [
        f"**One stream, {h.get('prompt_len')}-token prompt, {h.get('output_len')} tokens out:** "
        f"NVFP4 {_f(results['nvfp4_decode_tok_s_bs1'])} tok/s, BF16 {_f(results['bf16_decode_tok_s_bs1'])} tok/s"
        + (
            f", NVFP4 + MTP drafter {_f(results['mtp_decode_tok_s_bs1'])} tok/s "
            f"(×{_f(results.get('mtp_vs_nvfp4_decode_bs1'), '.2f')} NVFP4"
            + (f"; stand-in acceptance {results['mtp_acceptance']}" if results.get("dummy") else "")
            + ")"
            if results.get("mtp_decode_tok_s_bs1")
            else ""
        )
        + ".",
        "",
        f"**Against raw vLLM ({results.get('app_vs_raw_dtype')}):** "
        f"decode tok/s engine ×{_f(tok.get('engine'), '.3f')}, app ×{_f(tok.get('app'), '.3f')}; "
        f"TTFT engine ×{_f(ttft.get('engine'), '.3f')}, app ×{_f(ttft.get('app'), '.3f')}; "
        f"aggregate tok/s at the most streams engine ×{_f(agg.get('engine'), '.3f')}, "
        f"app ×{_f(agg.get('app'), '.3f')}.",
        "",
        *_served_line(results),
        *_sidebar_line(results.get("sidebar_vs_client")),
        "| arm | dtype | prompt | out | streams | TTFT p50 ms | TTFT p95 ms | vLLM TTFT p50 ms | decode tok/s a stream "
        "| aggregate tok/s | % of peak BW | tokens out |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["configs"]:
        for r in c["rows"]:
            tokens = (
                "–"
                if r["output_tokens_min"] is None
                else str(r["output_tokens_min"])
                if r["output_tokens_min"] == r["output_tokens_max"]
                else f"{r['output_tokens_min']}–{r['output_tokens_max']}"
            )
            flags = ("" if r["overlapped"] else " ⚠serialized") + (f" ⚠{r['errors']} errors" if r["errors"] else "")
            lines.append(
                f"| {r['arm']} | {r['dtype']} | {r['prompt_len']} | {r['output_len']} | {r['streams']} "
                f"| {_f(r['ttft_p50_ms'], '.0f')} | {_f(r['ttft_p95_ms'], '.0f')} "
                f"| {_f(r['engine_ttft_p50_ms'], '.0f')} "
                f"| {_f(r['decode_tok_s'])} | {_f(r['aggregate_tok_s'])} | {_f(r['bandwidth_fraction'], '.1f', 100)} "
                f"| {tokens}{flags} |"
            )
    lines += [
        "",
        "One-stream TTFT (TTFT probe + one-stream runs), client clock; beside it vLLM's own first_token_latency "
        "(for the app arm: what its sidebar showed):",
        "",
        "| arm | dtype | prompt | samples | p50 ms | p95 ms | vLLM p50 ms | vLLM p95 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["configs"]:
        for p, t in c["ttft"].items():
            lines.append(
                f"| {c['arm']} | {c['dtype']} | {p} | {t['samples']} | {_f(t['p50_ms'], '.0f')} | "
                f"{_f(t['p95_ms'], '.0f')} | {_f(t['engine_p50_ms'], '.0f')} | {_f(t['engine_p95_ms'], '.0f')} |"
            )
    lines += [
        "",
        "| configuration | status | engine start s | compile cache | torch.compile s | start-up timeline s "
        "| GPU memory GiB | context | notes |",
        "|---|---|---:|---|---:|---|---:|---:|---|",
    ]
    for c in results["configs"]:
        facts = c.get("log_facts") or {}
        mem = (
            "–"
            if c["gpu_memory_used_gib"] is None
            else f"{c['gpu_memory_used_gib']:.1f} / {c['gpu_memory_total_gib']:.1f}"
        )
        hit = facts.get("compile_cache_hit")
        cache = c.get("start_cache") or "?"
        if hit is not None:
            cache += " (hit)" if hit else " (compiled)"
        context = f"{int(c['max_model_len']):,}" if c["max_model_len"] else "–"
        notes = "; ".join(c["notes"])[:200]
        if c["errors"]:
            notes = (notes + " · " if notes else "") + "error: " + c["errors"][0].splitlines()[0][:200]
        if c["skipped"]:
            notes = (notes + " · " if notes else "") + f"skipped {len(c['skipped'])} (time budget)"
        if facts.get("jit_after_warmup"):
            notes = (
                (notes + " · " if notes else "") + "⚠ Triton JIT after warm-up: " + ", ".join(facts["jit_after_warmup"])
            )
        steps = c.get("timeline") or {}
        short = {"core_start": "core", "weights_loaded": "weights", "compiled": "compiled", "cuda_graphs": "graphs",
                 "core_ready": "core ready"}  # fmt: skip
        line = " · ".join(f"{short[k]} {v:.0f}" for k, v in steps.items() if k in short)
        lines.append(
            f"| {c['name']} | {c['status']} | {_f(c['start_s'])} | {cache} | {_f(facts.get('torch_compile_s'))} "
            f"| {line or '–'} | {mem} | {context} | {notes.replace('|', '/')} |"
        )
    lines.append("")
    return "\n".join(lines)
