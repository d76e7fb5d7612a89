"""The benchmark harness without a GPU: its arithmetic, prompts, plans, reports, and its three arms' plumbing
with a fake engine (the driver and workers end to end; the app arm against the real chat UI)."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

import app
from bench import bandwidth, options, report, run, worker
from bench.checkpoints import TEXT_CONFIG
from bench.workload import (
    RequestResult,
    Run,
    Workload,
    build_prompt,
    build_prompts,
    percentile,
    summarize_run,
)
from engine.settings import EngineSettings
from tests.fakes import FakeArm

ROOT = Path(__file__).resolve().parent.parent
FULL = {"text_config": TEXT_CONFIG}


# ------------------------------------------------------------------------------------------- arithmetic


def test_percentiles_interpolate_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 20], 95) == pytest.approx(19.5)
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None and percentile([None, 5, None], 50) == 5
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_decode_rate_counts_the_tokens_after_the_first_chunk():
    r = RequestResult(prompt_tokens=10, output_tokens=101, submitted=0.5, first=1.0, last=2.0)
    assert r.ttft_s == 0.5 and r.decode_tok_s == pytest.approx(100.0)  # (n - 1) / (last - first), as engine.metrics
    r.first_chunk_tokens = 3  # a first chunk of 3 tokens: 98 came after it
    assert r.decode_tok_s == pytest.approx(98.0)
    assert RequestResult(None, 1, 0.0, 1.0, 1.0).decode_tok_s is None


def test_run_summary_aggregates_and_detects_serialized_streams():
    together = [RequestResult(8, 11, 0.0, 0.05 + i * 0.01, 1.0 + i * 0.01) for i in range(4)]
    s = summarize_run(Run(128, 11, 4), together)
    assert s["aggregate_tok_s"] == pytest.approx(44 / 1.03)
    assert s["decode_tok_s_mean"] == pytest.approx(10 / 0.95)
    assert s["overlapped"] is True and s["short_outputs"] == 0
    one_after_another = [RequestResult(8, 11, 0.0, 1.0 * i + 0.05, 1.0 * i + 1.0) for i in range(4)]
    assert summarize_run(Run(128, 11, 4), one_after_another)["overlapped"] is False
    assert summarize_run(Run(128, 20, 1), together[:1])["short_outputs"] == 1


# ---------------------------------------------------------------------------------------------- bandwidth


def test_bytes_per_token_from_the_full_size_config():
    p = bandwidth.active_params(FULL)
    assert p.quantizable == pytest.approx(3.07e9, rel=0.01)  # the 3.07 B quantized active parameters
    assert p.bf16 == pytest.approx(0.74e9, rel=0.02)  # the tied lm_head (+ the small routers)
    assert bandwidth.bytes_per_step(FULL, nvfp4=True) == pytest.approx(3.20e9, rel=0.03)
    assert bandwidth.bytes_per_step(FULL, nvfp4=False) == pytest.approx(7.6e9, rel=0.03)


def test_bandwidth_limit_per_gpu():
    h200 = bandwidth.limit(FULL, "NVIDIA H200")
    h100 = bandwidth.limit(FULL, "NVIDIA H100 80GB HBM3")
    assert h200.peak_tb_s == 4.8 and h100.peak_tb_s == 3.35
    # The issue's ~1340 / ~940 tok/s are these at ~90 % of peak bandwidth.
    assert 0.9 * h200.nvfp4_limit_tok_s_bs1 == pytest.approx(1340, rel=0.03)
    assert 0.9 * h100.nvfp4_limit_tok_s_bs1 == pytest.approx(940, rel=0.03)
    assert bandwidth.peak_bandwidth_tb_s("NVIDIA H100 PCIe") == 2.0
    assert bandwidth.peak_bandwidth_tb_s("Some Future GPU") is None
    assert bandwidth.limit(FULL, "Some Future GPU", peak_tb_s=1.0).nvfp4_limit_tok_s_bs1 == pytest.approx(
        1e12 / 3.226e9, rel=0.01
    )


def test_more_streams_read_more_experts_and_kv_but_share_the_rest():
    one = bandwidth.bytes_per_step(FULL, nvfp4=True, batch=1)
    four = bandwidth.bytes_per_step(FULL, nvfp4=True, batch=4)
    assert one < four < 4 * one
    assert bandwidth.expected_unique_experts(128, 8, 1) == pytest.approx(8)
    assert bandwidth.kv_bytes_per_token(FULL, 8192) > bandwidth.kv_bytes_per_token(FULL, 512) > 0
    frac = bandwidth.fraction_of_peak(FULL, nvfp4=True, aggregate_tok_s=245, batch=1, context=0, peak_tb_s=4.8)
    assert frac == pytest.approx(245 * 3.226e9 / 4.8e12, rel=0.01)


# ------------------------------------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("target", [128, 512, 2048, 8192])
def test_prompts_hit_their_token_count(tiny_tokenizer, target):
    prompt = build_prompt(tiny_tokenizer, target, index=3)
    assert abs(prompt.text_tokens - target) <= max(2, 0.02 * target)
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]) == prompt.text_tokens
    assert len(prompt.token_ids) == target  # raw vLLM gets exactly the target
    ids = tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prompt.token_ids[:4] == ids[:4] and prompt.token_ids[-6:] == ids[-6:]  # same chat framing


def test_every_request_has_its_own_prefix(tiny_tokenizer):
    prompts = build_prompts(tiny_tokenizer, {512: 4})
    heads = {tuple(p.token_ids[:16]) for p in prompts.prompts[512]}  # vLLM's prefix cache hashes 16-token blocks
    assert len(heads) == 4
    assert build_prompt(tiny_tokenizer, 512, 2).text == prompts.prompts[512][2].text  # every arm gets the same ones


def test_dummy_checkpoint_decodes_every_id_and_encodes_as_before(tiny_vision_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from bench import dummy

    folder = dummy.prepare(tmp_path, nvfp4=True, tokenizer_from=tiny_vision_model_dir)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "NVFP4"
    assert bandwidth.bytes_per_step(config, nvfp4=True) == pytest.approx(3.2e9, rel=0.03)
    wide = AutoTokenizer.from_pretrained(folder)
    tiny = AutoTokenizer.from_pretrained(tiny_vision_model_dir)
    assert len(wide) == TEXT_CONFIG["vocab_size"]
    text = build_prompt(tiny, 300, 0).text
    assert wide(text)["input_ids"] == tiny(text)["input_ids"]
    assert wide.decode([200_000]).strip() and tiny.decode([200_000]) == ""
    assert len({wide.decode([i]) for i in range(1024, 262_144, 997)}) == len(range(1024, 262_144, 997))
    bf16 = dummy.prepare(tmp_path, nvfp4=False, tokenizer_from=tiny_vision_model_dir, widen=False)
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())


# ------------------------------------------------------------------------------------------- matrix + CLI


def test_default_matrix_puts_the_headline_first_and_long_outputs_at_one_length():
    w = Workload()
    runs = w.runs()
    assert runs[0] == Run(512, 1000, 1) and runs[1] == Run(512, 1000, 4)
    assert {r.prompt_len for r in runs if r.output_len == 1000} == {512}
    assert {(r.prompt_len, r.output_len) for r in runs} >= {(p, 256) for p in w.prompt_lens}
    counts = w.prompt_requests()
    assert counts[512] == (1 + 4) + w.ttft_samples + 2 * (1 + 4)  # warm-up, probe, 2 outputs × (1 + 4 streams)
    assert counts[128] == (1 + 4) + w.ttft_samples + (1 + 4)
    assert set(w.warmups()) == {(r.prompt_len, r.streams) for r in runs}  # every shape is warmed up
    everywhere = Workload(long_output_prompt_len=None)
    assert {r.prompt_len for r in everywhere.runs() if r.output_len == 1000} == set(w.prompt_lens)


def test_cli_parses_the_matrix_flags():
    ns = run.parse_args(
        "--dummy --prompt-lens 512,2048 --output-lens 256,1000 --concurrency 1,4 --arms raw,app --dtypes nvfp4 "
        "--attention-backend TRITON_ATTN --moe-backend marlin --max-images-per-prompt 2".split()
    )
    assert ns.configs == [("raw", "nvfp4"), ("app", "nvfp4")]
    assert ns.prompt_lens == (512, 2048) and ns.concurrency == (1, 4)
    settings = options.engine_settings(ns, model="/m", load_format="dummy", dtype="nvfp4")
    assert settings.attention_backend == "TRITON_ATTN" and settings.moe_backend == "marlin"
    assert settings.max_images_per_prompt == 2 and settings.max_num_seqs == 4 and settings.max_model_len == 16384
    default = run.parse_args(["--dummy"])
    assert default.configs == [
        ("vllm", "nvfp4"),
        ("raw", "nvfp4"),
        ("engine", "nvfp4"),
        ("app", "nvfp4"),
        ("raw", "bf16"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        [],  # neither --dummy nor --model
        ["--dummy", "--configs", "fast:nvfp4"],
        ["--dummy", "--prompt-lens", "0,5"],
        ["--dummy", "--max-model-len", "4096"],  # 8192 + 1000 do not fit
        ["--dummy", "--no-such-setting", "1"],
        ["--dummy", "--model-len", "1"],
        ["--dummy", "--model", "/x"],
    ],
)
def test_cli_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)


def test_worker_command_lines_carry_the_same_settings(tmp_path):
    ns = run.parse_args(
        "--dummy --prompt-lens 512 --output-lens 64,128 --concurrency 1,2 --start-times --moe-backend marlin "
        "--configs vllm:nvfp4,raw:nvfp4,engine:nvfp4,app:nvfp4,raw:bf16 --enforce-eager".split()
    )
    models = {"nvfp4": "/ckpt/nv", "bf16": "/ckpt/bf"}
    plans = run.plan_workers(ns, models, set())
    names = [(p.name, p.cache_state, p.start_only) for p in plans]
    assert names == [
        ("vllm-nvfp4", "cold", False),  # plain vLLM compiles its own graphs
        ("raw-nvfp4", "cold", False),
        ("engine-nvfp4", "warm", False),
        ("app-nvfp4", "warm", False),
        ("raw-bf16", "cold", False),
        ("raw-bf16-restart", "warm", True),  # bf16 has one configuration: --start-times restarts it
    ]
    assert [p.cache_state for p in run.plan_workers(ns, models, {"nvfp4", "bf16"})][:2] == ["cold", "warm"]
    assert run.plan_workers(ns, models, {"nvfp4_plain"})[0].cache_state == "warm"
    driver_settings = options.engine_settings(ns, model="/ckpt/nv", load_format="dummy", dtype="nvfp4")
    for plan in plans:
        cmd = run.worker_command(ns, plan, tmp_path / "prompts.json", tmp_path)
        assert cmd[:3] == [sys.executable, "-m", "bench.worker"]
        wns = worker.parse_args(cmd[3:])
        assert (wns.arm, wns.dtype) == (plan.arm, plan.dtype)
        assert options.workload_from(wns) == options.workload_from(ns)
        config = EngineSettings.from_json(wns.settings)  # one object, parsed once
        assert config == dataclasses.replace(driver_settings, model=plan.model)
        assert config.load_format == "dummy" and config.enforce_eager
        assert wns.start_only == plan.start_only and (wns.prompts is None) == plan.start_only
        assert (wns.app_log is not None) == (plan.arm == "app")


def test_app_command_has_the_engine_settings_under_app_py_flags():
    ns = run.parse_args(
        "--dummy --attention-backend TRITON_ATTN --max-video-frames 8 --no-torch-compile "
        "--cuda-graph-max-tokens 1024".split()
    )
    settings = options.engine_settings(ns, model="/ckpt", load_format="dummy", dtype="nvfp4")
    cmd = options.app_command(settings, python="py", app="app.py", port=7999)
    text = " ".join(cmd)
    for part in ("--no-browser", "--port 7999", "--model /ckpt", "--backend vllm", "--max-model-len 16384",
                 "--gpu-memory-utilization 0.85", "--max-num-seqs 4", "--kv-cache-dtype fp8",
                 "--attention-backend TRITON_ATTN", "--load-format dummy", "--max-video-frames 8",
                 "--no-torch-compile", "--cuda-graph-max-tokens 1024"):  # fmt: skip
        assert part in text, part
    assert app.settings_from_args(app.parse_args(cmd[2:])) == settings  # the app runs what the other arms run
    assert "--moe-backend" not in text and "--enforce-eager" not in text  # defaults stay the app's
    assert "--draft-model" not in text  # the app drafts nothing by default, as the bench
    assert "--load-format" in options.app_flags_needed(cmd)


def test_mtp_configurations_draft_with_the_assistant_at_stand_in_acceptance_rates(tmp_path):
    ns = run.parse_args("--dummy --configs raw:nvfp4,raw:mtp,engine:mtp --mtp-acceptance 0.8,0.6,0.3".split())
    models = run.prepare_models(ns, tmp_path)
    assert models["mtp"] == models["nvfp4"]  # the same NVFP4 model, plus its drafter
    assert json.loads((Path(ns.draft_model) / "config.json").read_text())["model_type"] == "gemma4_assistant"
    for plan in run.plan_workers(ns, models, set()):
        wns = worker.parse_args(run.worker_command(ns, plan, tmp_path / "prompts.json", tmp_path)[3:])
        settings = EngineSettings.from_json(wns.settings)
        if plan.dtype == "mtp":
            assert settings.draft_model == ns.draft_model and settings.num_speculative_tokens == 3
            assert settings.synthetic_acceptance == (0.8, 0.6, 0.3)
        else:
            assert settings.draft_model is None and settings.synthetic_acceptance is None
    # The app arm gets them through app.py's (hidden) flag, like every other setting.
    app_plan = run.plan_workers(run.parse_args("--dummy --configs app:mtp".split()), models, set())[0]
    app_settings = options.engine_settings(ns, model=app_plan.model, load_format="dummy", dtype="mtp")
    cmd = options.app_command(app_settings, python="py", app="app.py", port=7999)
    assert "--synthetic-acceptance 0.8,0.6,0.3" in " ".join(cmd)
    assert app.settings_from_args(app.parse_args(cmd[2:])) == app_settings


# ---------------------------------------------------------------------------------------------- reports


def _result(arm, dtype, tok_s, ttft_ms, workload: Workload):
    def req(t0, out_len, streams=1):
        first = t0 + ttft_ms / 1000
        rate = tok_s if streams == 1 else tok_s * 0.7
        return RequestResult(512, out_len, t0, first, first + (out_len - 1) / rate, engine_ttft_s=ttft_ms / 2000)

    runs = [summarize_run(r, [req(0.0, r.output_len, r.streams) for _ in range(r.streams)]) for r in workload.runs()]
    probe = {str(p): [req(0.0, 8).to_dict() for _ in range(workload.ttft_samples)] for p in workload.prompt_lens}
    return {
        "arm": arm,
        "dtype": dtype,
        "name": f"{arm}-{dtype}",
        "status": "done",
        "settings": {"kv_cache_dtype": "fp8"},
        "start": {"seconds": 50.0, "cache": "warm"},
        "gpu_memory": {"name": "NVIDIA H200", "used_gib": 120.0, "total_gib": 139.8},
        "info": {"max_model_len": 16384},
        "versions": {"vllm": "0.26.0"},
        "runs": runs,
        "ttft_probe": probe,
        "notes": ["a note"],
        "errors": [],
        "skipped": [],
    }


def test_results_have_the_required_keys_and_render(tmp_path):
    w = Workload(prompt_lens=(128, 512), output_lens=(256, 1000), concurrency=(1, 4), ttft_samples=3)
    configs = [
        _result("vllm", "nvfp4", 200.0, 40.0, w),
        _result("raw", "nvfp4", 244.0, 50.0, w),
        _result("engine", "nvfp4", 240.0, 55.0, w),
        _result("app", "nvfp4", 220.0, 70.0, w),
        _result("raw", "bf16", 238.5, 60.0, w),
    ]
    meta = {"date": "2026-11-28", "gpu": "NVIDIA H200", "vllm_version": "0.26.0", "dummy": True,
            "workload": w.to_dict(), "versions": {}}  # fmt: skip
    results = report.build_results(meta, configs, FULL)
    for key in report.REQUIRED_KEYS:
        assert key in results
    assert results["nvfp4_decode_tok_s_bs1"] == pytest.approx(244.0)
    assert results["bf16_decode_tok_s_bs1"] == pytest.approx(238.5)
    assert results["app_vs_raw_tok_s"]["engine"] == pytest.approx(240 / 244)
    assert results["app_vs_raw_tok_s"]["app"] == pytest.approx(220 / 244)
    assert results["app_vs_raw_tok_s"]["min"] == pytest.approx(220 / 244)
    assert results["app_vs_raw_ttft"]["app"] == pytest.approx(70 / 50)
    # The kernels' goal: what the app serves against plain vLLM, one stream, four streams, TTFT.
    assert results["served_nvfp4_decode_tok_s_bs1"] == pytest.approx(220.0)
    assert results["vllm_reference_decode_tok_s_bs1"] == pytest.approx(200.0)
    assert results["served_vs_vllm_reference"]["decode_tok_s_bs1"] == pytest.approx(1.1)
    assert results["served_vs_vllm_reference"]["aggregate_tok_s"] == pytest.approx(1.1, rel=0.01)  # TTFTs differ
    assert results["served_vs_vllm_reference"]["ttft"] == pytest.approx(70 / 40)
    assert results["bandwidth_limit"]["nvfp4_limit_tok_s_bs1"] == pytest.approx(4.8e12 / 3.226e9, rel=0.01)
    row = results["configs"][1]["rows"][0]
    assert row["bandwidth_fraction"] == pytest.approx(244 * 3.226e9 / 4.8e12, rel=0.05)
    json.dumps(results)
    table = report.markdown(results)
    assert "| raw | nvfp4 | 512 | 1000 | 1 |" in table and "| app | nvfp4 |" in table and "| raw | bf16 |" in table
    assert "244.0" in table and "×0.902" in table
    assert "plain vLLM 0.26 (NVFP4, same run):** one stream 220.0 vs 200.0 tok/s (×1.100)" in table
    path, md = run.results_paths(tmp_path, "2026-11-28", report.gpu_slug("NVIDIA H100 80GB HBM3"), "")
    assert path.name == "2026-11-28-h100-80gb-hbm3.json" and md.suffix == ".md"
    run.write_results(path, md, results)
    assert run.results_paths(tmp_path, "2026-11-28", "h100-80gb-hbm3", "")[0].name.endswith("-2.json")


def test_results_without_measurements_still_have_every_key():
    meta = {"date": "d", "gpu": None, "vllm_version": None, "workload": Workload().to_dict()}
    results = report.build_results(meta, [{"arm": "raw", "dtype": "nvfp4", "name": "raw-nvfp4",
                                            "status": "failed to start", "errors": ["boom"]}], FULL)  # fmt: skip
    assert results["nvfp4_decode_tok_s_bs1"] is None and results["app_vs_raw_tok_s"]["min"] is None
    assert "failed to start" in report.markdown(results)


def test_log_facts_from_vllm_lines():
    text = (
        "INFO [monitor.py:48] torch.compile took 41.27 s in total\n"
        "INFO Model loading took 14.8 GiB memory and 3.1 seconds\n"
        "INFO GPU KV cache size: 4,612,000 tokens\n"
        "INFO Using TRITON_ATTN attention backend out of potential backends: ['TRITON_ATTN']\n"
        "INFO Directly load the compiled graph(s) for compile range (1, 8192) from the cache, took 2.1 s\n"
    )
    facts = report.log_facts(text)
    assert facts["torch_compile_s"] == 41.27 and facts["kv_cache_tokens"] == 4_612_000
    assert facts["attention_backend"] == "TRITON_ATTN" and facts["compile_cache_hit"] is True
    jit = "(EngineCore pid=1) WARNING 11-28 06:12:38 [jit_monitor.py:135] Triton kernel JIT compilation during " \
          "inference: {}. This causes a latency spike\n"  # fmt: skip
    warm = (
        jit.format("kernel_unified_attention")
        + "[bench] raw-nvfp4: warmed up in 4.3 s\n"
        + jit.format("fused_moe_kernel")
    )
    facts = report.log_facts(warm)
    assert facts["jit_during_warmup"] == ["kernel_unified_attention"] and facts["jit_after_warmup"] == [
        "fused_moe_kernel"
    ]


def test_start_up_timeline_from_vllm_timestamps():
    text = (
        "(EngineCore pid=864) INFO 11-28 06:11:18 [core.py:116] Initializing a V1 LLM engine (v0.26.0) with config\n"
        "(EngineCore pid=864) INFO 11-28 06:11:23 [gpu_model_runner.py:5347] Model loading took 0.13 GiB memory\n"
        "(EngineCore pid=864) INFO 11-28 06:11:52 [monitor.py:53] torch.compile took 26.53 s in total\n"
        "(EngineCore pid=864) INFO 11-28 06:12:17 [core.py:340] init engine (profile, create kv cache, warmup model)\n"
    )
    origin = time.mktime(time.strptime(f"{time.localtime().tm_year}-11-28 06:11:10", "%Y-%m-%d %H:%M:%S"))
    assert report.timeline(text, origin) == {"core_start": 8.0, "weights_loaded": 13.0, "compiled": 42.0,
                                             "core_ready": 67.0}  # fmt: skip
    assert report.timeline(text, None) == {}


# ----------------------------------------------------------------------------- worker and driver, faked


SMALL = "--prompt-lens 128,256 --output-lens 16,32 --concurrency 1,2 --long-output-prompt-len 256 --ttft-samples 2"


def test_worker_replays_the_workload_and_writes_its_json(tiny_tokenizer, tmp_path):
    w = options.workload_from(run.parse_args(["--dummy", *SMALL.split()]))
    build_prompts(tiny_tokenizer, w.prompt_requests()).save(tmp_path / "prompts.json")
    config = EngineSettings(model="/m", load_format="dummy")
    ns = worker.parse_args(
        ["--arm", "engine", "--dtype", "nvfp4", "--settings", config.to_json()]
        + f"--prompts {tmp_path / 'prompts.json'} --out {tmp_path / 'w.json'} {SMALL}".split()
    )
    w_ = worker.Worker(ns)
    w_.arm = fake = FakeArm()
    assert asyncio.run(w_.main()) == 0
    result = json.loads((tmp_path / "w.json").read_text())
    assert result["status"] == "done" and result["notes"] == ["fake engine"]
    assert [r["key"] for r in result["runs"]] == [r.key for r in w.runs()]
    assert set(result["ttft_probe"]) == {"128", "256"} and len(result["ttft_probe"]["128"]) == 2
    assert result["runs"][0]["output_tokens"] == [32]
    assert len(fake.seen) == sum(w.prompt_requests().values()) == len(set(fake.seen))  # each prompt once


FAKE_WORKER = f"""
import asyncio, sys
sys.path.insert(0, {str(ROOT)!r})
from bench import worker
from tests.fakes import FakeArm
ns = worker.parse_args(sys.argv[1:])
w = worker.Worker(ns)
w.arm = FakeArm()
if ns.arm == "engine" and ns.dtype == "bf16":
    raise SystemExit("this worker crashes")
sys.exit(asyncio.run(w.main()))
"""


def test_driver_runs_workers_and_merges_their_results(tiny_vision_model_dir, tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(run, "WORKER", [sys.executable, str(script)])
    out = tmp_path / "results"
    argv = (
        f"--dummy --tokenizer-from {tiny_vision_model_dir} --no-widen-tokenizer "
        "--configs raw:nvfp4,engine:nvfp4,raw:bf16,engine:bf16 "
        f"--out {out} --logs {tmp_path / 'logs'} --time-budget 300 {SMALL}"
    ).split()
    assert run.main(argv) == 1  # the crashing worker makes it fail, after merging the others
    (path,) = out.glob("*.json")
    results = json.loads(path.read_text())
    assert [c["status"] for c in results["configs"]] == ["done", "done", "done", "crashed"]
    assert results["configs"][0]["start_cache"] == "cold" and results["configs"][1]["start_cache"] == "warm"
    assert results["nvfp4_decode_tok_s_bs1"] > 0 and results["bf16_decode_tok_s_bs1"] > 0
    assert results["app_vs_raw_tok_s"]["engine"] > 0 and "app" not in results["app_vs_raw_tok_s"]
    assert path.with_suffix(".md").read_text().startswith("# Benchmark")
    printed = capsys.readouterr().out
    assert "[bench] raw-nvfp4: done" in printed and "| arm | dtype |" in printed
    assert "this worker crashes" in results["configs"][3]["errors"][0]

    # A second call adds to the same file (a matrix split over two calls of a time-limited machine).
    again = list(argv)
    again[again.index("--configs") + 1] = "engine:bf16"
    script.write_text(FAKE_WORKER.replace('raise SystemExit("this worker crashes")', "pass"))
    assert run.main([*again, "--append"]) == 0
    (same,) = out.glob("*.json")
    merged = json.loads(same.read_text())
    assert [c["name"] for c in merged["configs"]] == ["raw-nvfp4", "engine-nvfp4", "raw-bf16", "engine-bf16"]
    assert [c["status"] for c in merged["configs"]] == ["done"] * 4


def test_dry_run_prints_the_plan_without_starting_anything(tiny_vision_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "WORKER", ["false"])  # would fail if run
    argv = (
        f"--dummy --tokenizer-from {tiny_vision_model_dir} --no-widen-tokenizer --logs {tmp_path} --dry-run "
        f"--configs raw:nvfp4,raw:bf16 {SMALL}"
    )
    assert run.main(argv.split()) == 0
    printed = capsys.readouterr().out
    assert "raw-nvfp4 (cold start" in printed and "raw-bf16 (cold start" in printed and "estimated" in printed
    assert not list(tmp_path.glob("*.log"))


# ------------------------------------------------------------------------------ the app arm, faked engine

FAKE_APP = """
import argparse, sys
sys.path.insert(0, {root!r})
from chat.ui import build_ui, launch_options
from engine.settings import EngineSettings
from tests.fakes import PacedEngine

p = argparse.ArgumentParser()
p.add_argument("--port", type=int)
ns, _ = p.parse_known_args()
demo = build_ui(PacedEngine(load_s=1.0), EngineSettings(max_model_len=4096))
demo.queue(default_concurrency_limit=4)
demo.launch(server_name="127.0.0.1", server_port=ns.port, quiet=True, **launch_options())
"""


@pytest.fixture(scope="module")
def fake_app(tmp_path_factory):
    """The real chat UI over a fake engine, in its own process: (process, time it answered, url)."""
    from bench.app_client import AppProcess, free_port, wait_until_ready

    folder = tmp_path_factory.mktemp("fake-app")
    script = folder / "fake_app.py"
    script.write_text(textwrap.dedent(FAKE_APP.format(root=str(ROOT))))
    port = free_port()
    app = AppProcess([sys.executable, str(script), "--port", str(port)], cwd=ROOT, log_path=folder / "app.log",
                     env={"GRADIO_ANALYTICS_ENABLED": "False"})  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        yield app, wait_until_ready(url, app, timeout_s=120), url
    finally:
        assert app.stop() is not None
    assert not app.alive()


def test_app_arm_times_the_chat_api_of_the_real_ui(fake_app):
    from bench.app_client import AppClient, run_concurrently

    app, ready, url = fake_app
    assert ready - app.started > 1.0  # it waited out the fake load
    client = AppClient(url)
    session = client.session()
    assert session.opened  # as a browser's page opens it: Gradio's per-session setup is off the clock
    one = client.request(session, "hello", 150, expected_prompt_tokens=5)
    assert one.error is None and one.output_tokens == 150 and one.prompt_tokens == 11
    assert one.timing == "sse-arrival" and one.chunks >= 2
    assert 0.02 < one.ttft_s < 2.0 and 0.015 < one.engine_ttft_s < 0.5
    assert one.decode_tok_s == pytest.approx(one.engine_decode_tok_s, rel=0.5)  # client vs app clock
    two = run_concurrently(client.request, [(client.session(), f"hi {i}", 30) for i in range(2)])
    assert [r.output_tokens for r in two] == [30, 30]
    s = summarize_run(Run(8, 30, 2), two)
    assert s["overlapped"] is True  # the app's queue lets both run together


def test_the_sidebars_ttft_starts_when_the_message_reaches_the_server(fake_app):
    """Gradio's queue takes ~20 ms between the HTTP request and the chat function (measured on a 2-core machine);
    the sidebar's TTFT counts it, so a client sees only the network and one SSE message more."""
    from bench.app_client import AppClient

    client = AppClient(fake_app[2])
    gaps = [r.ttft_s - r.engine_ttft_s for r in (client.request(client.session(), "hi", 4) for _ in range(7))]
    assert all(gap > 0 for gap in gaps)  # the client's clock starts first
    assert sorted(gaps)[3] < 0.012, gaps  # without the arrival stamp: ~0.019 s here


def test_the_sidebar_is_compared_with_the_client_request_by_request():
    def request(ttft_s, sidebar_ttft_s, tokens, rate, sidebar_rate):
        return {"ttft_s": ttft_s, "engine_ttft_s": sidebar_ttft_s, "output_tokens": tokens,
                "decode_tok_s": rate, "engine_decode_tok_s": sidebar_rate}  # fmt: skip

    app = {
        "ttft_probe": {"2048": [request(0.200, 0.196, 8, 150.0, 160.0)]},  # 8 tokens: its rate is not compared
        "runs": [
            {"streams": 1, "requests_detail": [request(0.210, 0.205, 1000, 240.0, 242.4)]},
            {"streams": 4, "requests_detail": [request(0.900, 0.300, 1000, 100.0, 200.0)] * 4},  # not one stream
        ],
    }
    agreement = report.sidebar_vs_client(app)
    assert agreement["ttft_ratios"] == pytest.approx([0.98, 0.205 / 0.210])
    assert agreement["decode_ratios"] == pytest.approx([1.01])
    assert agreement["max_deviation"] == pytest.approx(1 - 0.205 / 0.210)
    assert "largest deviation 2.4 %" in report._sidebar_line(agreement)[0]


def test_the_profile_summary_counts_gpu_busy_time_once_where_kernels_overlap(tmp_path):
    from bench import profile

    events = [
        {"cat": "kernel", "name": "gemm", "ts": 0.0, "dur": 100.0},
        {"cat": "kernel", "name": "moe", "ts": 50.0, "dur": 100.0},  # overlaps the gemm by 50 us
        {"cat": "kernel", "name": "gemm", "ts": 300.0, "dur": 100.0},  # 150 us idle before it
        {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0.0, "dur": 5.0},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 500.0},
    ]
    trace = tmp_path / "t.json.gz"
    trace.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    s = profile.summarize(trace, steps=1)
    assert s["gpu_window_ms"] == pytest.approx(0.4) and s["gpu_busy_ms"] == pytest.approx(0.25)
    assert s["kernels_per_step"] == 3 and s["graph_launches_per_step"] == 1
    assert s["top_kernels_us_per_step"][0] == ("gemm", 200.0)
