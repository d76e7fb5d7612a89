"""nvfp4.doctor on planted defects: each one reported, and repaired by --fix where a repair exists."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4 import codec, doctor
from nvfp4.layout import Checkpoint
from nvfp4.quantize import quantize_checkpoint

L0 = "model.language_model.layers.0"
EXP = f"{L0}.moe.experts"


@pytest.fixture(scope="module")
def quantized(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("q") / "clean", calib_samples=2)


def plant(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor], dict], None]) -> Path:
    """A copy of `src` with `edit(tensors, config)` applied (the tiny checkpoint is one shard)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def module(t: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t[f"{name}.weight"], t[f"{name}.weight_scale"], t[f"{name}.weight_scale_2"]


def set_module(t: dict[str, torch.Tensor], name: str, encoded) -> None:
    t[f"{name}.weight"], t[f"{name}.weight_scale"], t[f"{name}.weight_scale_2"] = encoded


def digest(path: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(path.iterdir()))).hexdigest()


def kinds(report: doctor.Report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in report.findings:
        out.setdefault(f.kind, []).append(f.module)
    return out


def fixed(report: doctor.Report, tmp_path: Path) -> Checkpoint:
    before = digest(report.path)
    assert doctor.main([str(report.path), "--fix", str(tmp_path / "fixed")]) == 0
    assert digest(report.path) == before, "--fix must not touch the original"
    after = doctor.diagnose(tmp_path / "fixed")
    assert after.ok, after.text()
    return Checkpoint(tmp_path / "fixed")


def test_missing_input_scale(quantized: Path, tmp_path: Path):
    bad = plant(quantized, tmp_path / "bad", lambda t, c: t.pop(f"{EXP}.3.gate_proj.input_scale"))
    report = doctor.diagnose(bad)
    assert kinds(report) == {"missing_input_scale": [f"{EXP}.3.gate_proj"]}
    ckpt = fixed(report, tmp_path)
    same_input = [
        float(ckpt.get(f"{EXP}.{e}.{p}.input_scale")) for e in range(8) if e != 3 for p in ("gate_proj", "up_proj")
    ]
    assert float(ckpt.get(f"{EXP}.3.gate_proj.input_scale")) == pytest.approx(max(same_input))


def test_gate_up_scale_mismatch(quantized: Path, tmp_path: Path):
    """Up with twice the gate's global scale and halved block scales: the same values, a scale vLLM ignores."""
    clean = Checkpoint(quantized)
    gate0 = codec.dequantize(
        *(clean.get(f"{EXP}.2.gate_proj.{s}") for s in ("weight", "weight_scale", "weight_scale_2"))
    )
    up0 = codec.dequantize(*(clean.get(f"{EXP}.2.up_proj.{s}") for s in ("weight", "weight_scale", "weight_scale_2")))

    def edit(t, c):
        g = t[f"{EXP}.2.up_proj.weight_scale_2"]
        set_module(t, f"{EXP}.2.up_proj", codec.quantize(up0, 2 * codec.amax_from_scale(g)))

    bad = plant(quantized, tmp_path / "bad", edit)
    report = doctor.diagnose(bad)
    assert kinds(report) == {"scale_mismatch": [f"{EXP}.2.gate_proj+up_proj"]}
    assert "keeps the gate's" in report.findings[0].message and "up_proj 50.0%" in report.findings[0].message
    ckpt = fixed(report, tmp_path)
    gate = codec.dequantize(*(ckpt.get(f"{EXP}.2.gate_proj.{s}") for s in ("weight", "weight_scale", "weight_scale_2")))
    up = codec.dequantize(*(ckpt.get(f"{EXP}.2.up_proj.{s}") for s in ("weight", "weight_scale", "weight_scale_2")))
    assert torch.equal(ckpt.get(f"{EXP}.2.gate_proj.weight_scale_2"), ckpt.get(f"{EXP}.2.up_proj.weight_scale_2"))
    assert torch.equal(up, up0) and torch.equal(gate, gate0)  # halving float8 block scales is exact here


def test_qkv_scale_mismatch_is_requantized_within_the_error_bound(quantized: Path, tmp_path: Path):
    k = "model.language_model.layers.1.self_attn.k_proj"

    def edit(t, c):
        set_module(t, k, codec.quantize(codec.dequantize(*module(t, k)) * 0.25))

    bad = plant(quantized, tmp_path / "bad", edit)
    report = doctor.diagnose(bad)
    assert kinds(report) == {"scale_mismatch": ["model.language_model.layers.1.self_attn.q_proj+k_proj+v_proj"]}
    assert "keeps the largest" in report.findings[0].message
    planted = codec.dequantize(*module(load_file(bad / "model.safetensors"), k))
    ckpt = fixed(report, tmp_path)
    repaired = codec.dequantize(*(ckpt.get(f"{k}.{s}") for s in ("weight", "weight_scale", "weight_scale_2")))
    assert float((repaired - planted).norm() / planted.norm()) < 0.11


def test_wrong_dtypes_are_cast(quantized: Path, tmp_path: Path):
    def edit(t, c):
        t[f"{EXP}.5.down_proj.weight_scale_2"] = t[f"{EXP}.5.down_proj.weight_scale_2"].to(torch.bfloat16)
        t[f"{EXP}.6.up_proj.weight_scale"] = t[f"{EXP}.6.up_proj.weight_scale"].float()

    report = doctor.diagnose(plant(quantized, tmp_path / "bad", edit))
    assert sorted(kinds(report)["dtype"]) == [f"{EXP}.5.down_proj.weight_scale_2", f"{EXP}.6.up_proj.weight_scale"]
    ckpt = fixed(report, tmp_path)
    assert ckpt.tensors[f"{EXP}.6.up_proj.weight_scale"].dtype == "F8_E4M3"
    assert torch.equal(
        ckpt.get(f"{EXP}.6.up_proj.weight_scale"), Checkpoint(quantized).get(f"{EXP}.6.up_proj.weight_scale")
    )


def test_exclusion_gaps(quantized: Path, tmp_path: Path):
    def edit(t, c):
        ignore = c["quantization_config"]["ignore"]
        ignore.remove("model.embed_vision*")
        ignore.append(f"{L0}.mlp.down_proj")

    report = doctor.diagnose(plant(quantized, tmp_path / "bad", edit))
    assert sorted(kinds(report)["exclusion"]) == ["model.embed_vision.embedding_projection", f"{L0}.mlp.down_proj"]
    assert not all(f.in_stream for f in report.findings)  # an ignore-list change is not a weight repair
    ckpt = fixed(report, tmp_path)
    assert ckpt.tensors[f"{L0}.mlp.down_proj.weight"].dtype == "BF16"
    assert "model.embed_vision.embedding_projection" in ckpt.ignore


def test_unrepairable_defects_are_refused(quantized: Path, tmp_path: Path, capsys):
    def edit(t, c):
        t[f"{EXP}.6.up_proj.weight_scale2"] = t.pop(f"{EXP}.6.up_proj.weight_scale_2")  # renamed key
        t[f"{EXP}.7.down_proj.input_scale"] = torch.ones(2)  # wrong shape

    bad = plant(quantized, tmp_path / "bad", edit)
    report = doctor.diagnose(bad)
    assert kinds(report) == {
        "unexpected": [f"{EXP}.6.up_proj.weight_scale2"],
        "missing": [f"{EXP}.6.up_proj.weight_scale_2"],
        "shape": [f"{EXP}.7.down_proj.input_scale"],
    }
    assert not report.repairable
    assert doctor.main([str(bad), "--fix", str(tmp_path / "fixed")]) == 1
    assert not (tmp_path / "fixed").exists()
    assert "needs a re-export" in capsys.readouterr().out


def test_renamed_expert_prefix_is_fine(quantized: Path, tmp_path: Path):
    """`<layer>.experts.<E>` (transformers' naming) loads in vLLM 0.26 like `.moe.experts.<E>`."""

    def edit(t, c):
        for key in [k for k in t if ".moe.experts." in k]:
            t[key.replace(".moe.experts.", ".experts.")] = t.pop(key)

    report = doctor.diagnose(plant(quantized, tmp_path / "bad", edit))
    assert report.ok and "`.experts.<E>`" in report.layout


def test_cli_exit_codes(quantized: Path, tiny_model_dir: Path, tmp_path: Path, capsys):
    assert doctor.main([str(quantized), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert doctor.main([str(tiny_model_dir)]) == 0  # BF16: nothing to check, nothing wrong
    bad = plant(quantized, tmp_path / "bad", lambda t, c: t.pop(f"{EXP}.0.down_proj.input_scale"))
    assert doctor.main([str(bad)]) == 1
    (tmp_path / "empty").mkdir()
    assert doctor.main([str(tmp_path / "empty")]) == 2
