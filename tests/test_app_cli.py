from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import app
from chat.history import default_data_dir
from engine import factory
from engine.settings import EngineSettings

ROOT = Path(__file__).resolve().parent.parent

FLAG_DEFAULTS = {
    "--model": EngineSettings().model,
    "--backend": "auto",
    "--base-url": "None",
    "--remote-api-key": "None",
    "--host": "127.0.0.1",
    "--port": "7860",
    "--share": "False",
    "--auth": "None",
    "--auth-file": "None",
    "--api-key": "None",
    "--api-key-file": "None",
    "--no-api": "False",
    "--data-dir": str(default_data_dir()),
    "--max-queue": "64",
    "--rate-limit": "20",
    "--max-upload-mb": "200.0",
    "--desktop": "False",
    "--max-model-len": "262144",
    "--kv-cache-dtype": "fp8",
    "--gpu-memory-utilization": "0.85",
    "--max-num-seqs": "4",
    "--tensor-parallel-size": "1",
    "--quantization": "None",
    "--moe-backend": "None",
    "--linear-backend": "None",
    "--attention-backend": "None",
    "--no-browser": "False",
    "--load-format": "auto",
    "--enforce-eager": "False",
    "--max-images-per-prompt": "8",
    "--max-videos-per-prompt": "1",
    "--cuda-graph-max-tokens": "2048",
    "--no-torch-compile": "False",
    "--small-batch-kernels": "auto",
    "--draft-model": "None",
    "--num-speculative-tokens": "2",
    "--expert-view": "False",
    "--max-video-frames": "32",
    "--video-fps": "1.0",
    "--log-level": "info",
}


def test_defaults_are_the_engine_settings_defaults():
    ns = app.parse_args([])
    assert app.settings_from_args(ns) == EngineSettings()
    assert (ns.host, ns.port, ns.share, ns.auth, ns.no_browser, ns.log_level) == (
        "127.0.0.1",
        7860,
        False,
        None,
        False,
        "info",
    )


def test_every_engine_flag_reaches_the_settings():
    ns = app.parse_args(
        [
            "--model",
            "/models/gemma",
            "--backend",
            "openai",
            "--base-url",
            "http://spark:8000/v1",
            "--remote-api-key",
            "sk-1",
            "--max-model-len",
            "32768",
            "--kv-cache-dtype",
            "auto",
            "--gpu-memory-utilization",
            "0.9",
            "--max-num-seqs",
            "8",
            "--tensor-parallel-size",
            "2",
            "--quantization",
            "modelopt",
            "--moe-backend",
            "marlin",
            "--linear-backend",
            "cutlass",
            "--attention-backend",
            "TRITON_ATTN",
            "--max-video-frames",
            "16",
            "--video-fps",
            "0.5",
            "--draft-model",
            "/models/gemma-assistant",
            "--num-speculative-tokens",
            "3",
            "--cuda-graph-max-tokens",
            "1024",
            "--no-torch-compile",
        ]
    )
    assert app.settings_from_args(ns) == EngineSettings(
        model="/models/gemma",
        backend="openai",
        base_url="http://spark:8000/v1",
        remote_api_key="sk-1",
        max_model_len=32768,
        kv_cache_dtype="auto",
        gpu_memory_utilization=0.9,
        max_num_seqs=8,
        tensor_parallel_size=2,
        quantization="modelopt",
        moe_backend="marlin",
        linear_backend="cutlass",
        attention_backend="TRITON_ATTN",
        max_video_frames=16,
        video_fps=0.5,
        draft_model="/models/gemma-assistant",
        num_speculative_tokens=3,
        cuda_graph_max_tokens=1024,
        torch_compile=False,
    )


def test_max_model_len_auto_means_the_models_own():
    assert app.settings_from_args(app.parse_args(["--max-model-len", "auto"])).max_model_len is None


def test_cuda_graphs_none_leaves_vllms_default():
    assert app.settings_from_args(app.parse_args(["--cuda-graph-max-tokens", "none"])).cuda_graph_max_tokens is None
    with pytest.raises(SystemExit):
        app.parse_args(["--cuda-graph-max-tokens", "0"])


def test_draft_model_none_switches_mtp_off():
    assert app.settings_from_args(app.parse_args(["--draft-model", "auto"])).draft_model == "auto"
    assert app.settings_from_args(app.parse_args(["--draft-model", "none"])).draft_model is None


@pytest.mark.parametrize("bad", ["0", "-5", "lots"])
def test_max_model_len_rejects_nonsense(bad):
    with pytest.raises(SystemExit):
        app.parse_args(["--max-model-len", bad])


@pytest.mark.parametrize(
    ("flag", "bad"),
    [("--max-video-frames", "0"), ("--max-video-frames", "33"), ("--video-fps", "0"), ("--video-fps", "nan")],
)
def test_video_flags_reject_what_gemma_4_cannot_take(flag, bad):
    with pytest.raises(SystemExit):
        app.parse_args([flag, bad])


def test_server_flags():
    ns = app.parse_args(["--host", "0.0.0.0", "--port", "8080", "--share", "--no-browser", "--log-level", "debug"])
    assert (ns.host, ns.port, ns.share, ns.no_browser, ns.log_level) == ("0.0.0.0", 8080, True, True, "debug")


def test_auth_is_repeatable_and_splits_at_the_first_colon():
    ns = app.parse_args(["--auth", "ann:secret", "--auth", "bob:pa:ss"])
    assert ns.auth == [("ann", "secret"), ("bob", "pa:ss")]


@pytest.mark.parametrize("bad", ["nopassword", ":pass", "user:"])
def test_auth_needs_user_and_password(bad, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", bad])
    assert "USER:PASS" in capsys.readouterr().err


def test_auth_file_logins_join_the_auth_flags(tmp_path):
    logins = tmp_path / "logins"
    logins.write_text("# who may log in\ncid:pw1\n\n  dee:p:w2  \n")
    ns = app.parse_args(["--auth", "ann:secret", "--auth-file", str(logins)])
    assert app.logins(ns) == [("ann", "secret"), ("cid", "pw1"), ("dee", "p:w2")]
    assert app.logins(app.parse_args([])) is None


@pytest.mark.parametrize(
    ("text", "error"), [("ann:pw\nnocolon\n", "line 2: expected USER:PASS"), ("# only\n", "no USER")]
)
def test_a_bad_auth_file_is_refused_with_the_line(tmp_path, capsys, text, error):
    logins = tmp_path / "logins"
    logins.write_text(text)
    with pytest.raises(SystemExit):
        app.parse_args(["--auth-file", str(logins)])
    assert error in capsys.readouterr().err


def test_api_key_flags_serve_v1_with_a_key(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("\n  sk-from-file  \nsecond line\n")
    assert app.parse_args(["--api-key-file", str(key_file)]).api_key_file == "sk-from-file"
    access = app.api_access(app.parse_args(["--api-key", "sk-1", "--share", "--host", "0.0.0.0"]))
    assert access.served and access.key == "sk-1" and not access.local_only
    assert app.api_access(app.parse_args(["--api-key-file", str(key_file)])).key == "sk-from-file"
    assert app.settings_from_args(app.parse_args(["--api-key", "sk-1"])).remote_api_key is None  # not the engine's


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--api-key", "a", "--api-key-file", __file__], "not allowed with argument"),
        (["--api-key", "  "], "expected a key"),
        (["--api-key-file", "/nonexistent/key"], "can't read"),
    ],
)
def test_bad_api_key_flags_are_refused(argv, error, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(argv)
    assert error in capsys.readouterr().err


def test_an_empty_api_key_file_is_refused(tmp_path, capsys):
    (tmp_path / "key").write_text("\n\n")
    with pytest.raises(SystemExit):
        app.parse_args(["--api-key-file", str(tmp_path / "key")])
    assert "holds no key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "served"),
    [
        ([], True),
        (["--no-api"], False),
        (["--share"], False),
        (["--host", "0.0.0.0"], False),
        (["--auth", "a:b"], False),
    ],
)
def test_v1_is_served_without_a_key_on_this_machine_only(argv, served):
    assert app.api_access(app.parse_args(argv)).served is served


def test_a_missing_auth_file_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--auth-file", str(tmp_path / "nope")])
    assert "can't read" in capsys.readouterr().err


def test_sharing_and_limit_flags(tmp_path):
    ns = app.parse_args(
        ["--data-dir", str(tmp_path), "--max-queue", "8", "--rate-limit", "0", "--max-upload-mb", "1.5", "--desktop"]
    )
    assert (ns.data_dir, ns.max_queue, ns.rate_limit, ns.max_upload_mb, ns.desktop) == (tmp_path, 8, 0, 1.5, True)


@pytest.mark.parametrize(("flag", "bad"), [("--max-queue", "0"), ("--rate-limit", "-1"), ("--max-upload-mb", "0")])
def test_limit_flags_reject_nonsense(flag, bad):
    with pytest.raises(SystemExit):
        app.parse_args([flag, bad])


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit):
        app.parse_args(["--backend", "llamacpp"])


def test_help_lists_every_flag_with_its_default():
    out = subprocess.run(
        [sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    options = out.split("\noptions:\n", 1)[1]
    entries = {}
    for chunk in re.split(r"\n  (?=-)", "\n" + options)[1:]:  # one chunk per option, help lines included
        words = " ".join(chunk.split())
        entries[words.split()[0].rstrip(",")] = words
    assert set(entries) == {"-h", *FLAG_DEFAULTS}
    for flag, default in FLAG_DEFAULTS.items():
        # argparse wraps long defaults at hyphens; join the pieces back before comparing.
        assert f"(default: {default})" in entries[flag].replace("- ", "-"), flag


def test_a_backend_that_cannot_run_exits_2_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(factory, "cuda_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--backend", "auto", "--no-browser"])
    assert exit_info.value.code == 2
    assert "error: --backend auto picks vLLM, but no CUDA GPU is visible" in capsys.readouterr().err
