"""nvfp4.quantize on the tiny Gemma 4: the layout vLLM loads, shared scales, calibration, and a clean doctor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nvfp4 import codec, quantize
from nvfp4.doctor import diagnose
from nvfp4.layout import Checkpoint

L0 = "model.language_model.layers.0"
SAMPLES = 4


@pytest.fixture(scope="module")
def quantized(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return quantize.quantize_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("q") / "out", calib_samples=SAMPLES)


def dequantized(ckpt: Checkpoint, module: str) -> torch.Tensor:
    return codec.dequantize(*(ckpt.get(f"{module}.{s}") for s in ("weight", "weight_scale", "weight_scale_2")))


def test_layout_and_config(quantized: Path, tiny_model_dir: Path):
    ckpt, src = Checkpoint(quantized), Checkpoint(tiny_model_dir)
    text = ckpt.text_config
    experts, inter, hidden = text["num_experts"], text["moe_intermediate_size"], text["hidden_size"]
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in ckpt.tensors)
    for e in range(experts):
        for proj, shape in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ):
            t = {
                s: ckpt.tensors[f"{L0}.moe.experts.{e}.{proj}.{s}"]
                for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")
            }
            assert (t["weight"].dtype, t["weight"].shape) == ("U8", (shape[0], shape[1] // 2))
            assert (t["weight_scale"].dtype, t["weight_scale"].shape) == ("F8_E4M3", (shape[0], shape[1] // 16))
            assert (t["weight_scale_2"].dtype, t["weight_scale_2"].shape) == ("F32", ())
            assert (t["input_scale"].dtype, t["input_scale"].shape) == ("F32", ())
    for kept in (
        "model.language_model.embed_tokens.weight",
        f"{L0}.router.proj.weight",
        "model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight",
        "model.embed_vision.embedding_projection.weight",
    ):
        assert torch.equal(ckpt.get(kept), src.get(kept)) and ckpt.tensors[kept].dtype == "BF16"
    assert ckpt.tensors[f"{L0}.self_attn.q_proj.weight"].dtype == "U8"
    assert ckpt.tensors[f"{L0}.mlp.down_proj.weight"].dtype == "U8"

    qc = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["quant_algo"], qc["group_size"]) == ("modelopt", "NVFP4", 16)
    assert {"lm_head", "model.language_model.layers.*.router*", "model.vision_tower*"} <= set(qc["ignore"])
    legacy = json.loads((quantized / "hf_quant_config.json").read_text())["quantization"]
    assert legacy["exclude_modules"] == qc["ignore"] and legacy["quant_algo"] == "NVFP4"
    assert (quantized / "tokenizer.json").exists() and (quantized / "chat_template.jinja").exists()


def test_doctor_finds_it_clean(quantized: Path):
    report = diagnose(quantized)
    assert report.ok, report.text()
    assert "`.moe.experts.<E>`" in report.layout


def test_fused_shards_share_one_global_scale(quantized: Path):
    ckpt = Checkpoint(quantized)
    for e in range(ckpt.text_config["num_experts"]):
        base = f"{L0}.moe.experts.{e}"
        assert torch.equal(ckpt.get(f"{base}.gate_proj.weight_scale_2"), ckpt.get(f"{base}.up_proj.weight_scale_2"))
        assert torch.equal(ckpt.get(f"{base}.gate_proj.input_scale"), ckpt.get(f"{base}.up_proj.input_scale"))
    qkv = [ckpt.get(f"{L0}.self_attn.{p}_proj.weight_scale_2") for p in "qkv"]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
    full = "model.language_model.layers.1.self_attn"  # k_eq_v: no v_proj
    assert torch.equal(ckpt.get(f"{full}.q_proj.weight_scale_2"), ckpt.get(f"{full}.k_proj.weight_scale_2"))


def test_weights_survive_within_nvfp4_error(quantized: Path, tiny_model_dir: Path):
    ckpt, src = Checkpoint(quantized), Checkpoint(tiny_model_dir)
    gate_up = src.get(f"{L0}.experts.gate_up_proj").float()
    inter = gate_up.shape[1] // 2
    pairs = [
        (dequantized(ckpt, f"{L0}.moe.experts.3.up_proj"), gate_up[3, inter:]),
        (dequantized(ckpt, f"{L0}.self_attn.o_proj"), src.get(f"{L0}.self_attn.o_proj.weight").float()),
    ]
    for dq, w in pairs:
        assert float((dq - w).norm() / w.norm()) < 0.11


def test_input_scales_come_from_calibration(quantized: Path, tiny_model_dir: Path):
    from nvfp4.calibrate import calibrate

    calib = calibrate(Checkpoint(tiny_model_dir), SAMPLES)
    assert calib.tokens > 0
    ckpt = Checkpoint(quantized)
    q = float(ckpt.get(f"{L0}.self_attn.q_proj.input_scale"))
    assert q == pytest.approx(calib.amax[f"{L0}.self_attn.q_proj"] / 2688)
    counts = calib.expert_tokens[L0]
    assert all(counts), "the tiny model's 4 samples reach every expert"
    down = float(ckpt.get(f"{L0}.moe.experts.5.down_proj.input_scale"))
    assert down == pytest.approx(calib.amax[f"{L0}.experts.5.down_proj"] / 2688)


def test_unreached_expert_gets_estimated_input_scales(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    real = quantize.calibrate

    def without_expert_0(*args, **kwargs):
        calib = real(*args, **kwargs)
        calib.expert_tokens[L0][0] = 0
        del calib.amax[f"{L0}.experts.0.gate_proj"], calib.amax[f"{L0}.experts.0.down_proj"]
        return calib

    monkeypatch.setattr(quantize, "calibrate", without_expert_0)
    ckpt = Checkpoint(quantize.quantize_checkpoint(tiny_model_dir, tmp_path / "q", calib_samples=SAMPLES))
    gate = [float(ckpt.get(f"{L0}.moe.experts.{e}.gate_proj.input_scale")) for e in range(8)]
    # Every token reaches some expert, so the layer-wide input maximum is the largest per-expert one.
    assert gate[0] == max(gate) > 0
    assert float(ckpt.get(f"{L0}.moe.experts.0.down_proj.input_scale")) > 0
    assert diagnose(ckpt.path).ok


def test_exclude_keeps_modules_bf16(tiny_model_dir: Path, tmp_path: Path):
    out = quantize.quantize_checkpoint(tiny_model_dir, tmp_path / "q", calib_samples=1, exclude=["*.self_attn*"])
    ckpt = Checkpoint(out)
    assert ckpt.tensors[f"{L0}.self_attn.q_proj.weight"].dtype == "BF16"
    assert f"{L0}.self_attn.q_proj.weight_scale" not in ckpt.tensors
    assert ckpt.tensors[f"{L0}.mlp.up_proj.weight"].dtype == "U8"
    assert "*.self_attn*" in ckpt.ignore
    assert diagnose(out).ok


def test_exclude_may_not_split_fused_shards(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="splits"):
        quantize.quantize_checkpoint(tiny_model_dir, tmp_path / "q", calib_samples=1, exclude=["*.k_proj"])


def test_cli(tiny_model_dir: Path, tmp_path: Path, capsys):
    assert quantize.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--calib-samples", "1"]) == 0
    assert "quantized layer 2/2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already quantized"):
        quantize.quantize_checkpoint(tmp_path / "q", tmp_path / "again")
