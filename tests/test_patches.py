"""patches against vLLM 0.26's real Gemma 4 loading code, fed the tiny NVFP4 checkpoint's keys on CPU.

The model is a stand-in: the real `load_weights` of Gemma4ForConditionalGeneration, Gemma4ForCausalLM and
Gemma4Model run on modules whose parameters (named as vLLM's Gemma 4 names them) record what their
weight loaders receive, so a test sees which tensor reaches which FusedMoE / qkv parameter and shard.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import patches
from nvfp4 import codec, doctor
from nvfp4.layout import QUANT_SUFFIXES, Checkpoint
from nvfp4.quantize import quantize_checkpoint

gemma4 = pytest.importorskip("vllm.model_executor.models.gemma4")
from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration  # noqa: E402

L0 = "model.language_model.layers.0"
EXP = f"{L0}.moe.experts"
NUM_EXPERTS = 8


@pytest.fixture(scope="module")
def quantized(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("q") / "clean", calib_samples=2)


@pytest.fixture(autouse=True)
def no_plan():
    yield
    patches._plan = None  # a test's repairs must not leak into the next one


def plant(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def encoded(t: dict, name: str):
    return t[f"{name}.weight"], t[f"{name}.weight_scale"], t[f"{name}.weight_scale_2"]


def repairable_defects(t: dict) -> None:
    """Expert 2's up with twice the gate's global scale (same values), expert 3's gate without input scale."""
    up = f"{EXP}.2.up_proj"
    g = t[f"{up}.weight_scale_2"]
    t[f"{up}.weight"], t[f"{up}.weight_scale"], t[f"{up}.weight_scale_2"] = codec.quantize(
        codec.dequantize(*encoded(t, up)), 2 * codec.amax_from_scale(g)
    )
    del t[f"{EXP}.3.gate_proj.input_scale"]


# --- a recording stand-in for vLLM's Gemma 4 model -----------------------------------------------------


class TextModel(nn.Module):
    """Gemma4Model's load_weights over parameters that record their loads."""

    load_weights = gemma4.Gemma4Model.load_weights

    def __init__(self, config, loads: dict):
        super().__init__()
        self.config = config
        names = []
        for i in range(config.num_hidden_layers):
            for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                names += [f"layers.{i}.{module}.{s}" for s in QUANT_SUFFIXES]
            names += [f"layers.{i}.moe.experts.routed_experts.{w}_{s}" for w in ("w13", "w2") for s in QUANT_SUFFIXES]
        for name in names:
            param = nn.Parameter(torch.empty(0), requires_grad=False)
            param.weight_loader = lambda p, w, *args, _name=name, **kw: loads[_name].append((args, kw, w))
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.register_parameter(leaf, param)


class Consumer(nn.Module):
    """A tower: takes its weights and loads nothing."""

    def load_weights(self, weights):
        return {name for name, _ in weights}


class CausalLM(nn.Module):
    load_weights = gemma4.Gemma4ForCausalLM.load_weights

    def __init__(self, config, loads):
        super().__init__()
        self.config = config
        self.model = TextModel(config, loads)


class Multimodal(nn.Module):
    hf_to_vllm_mapper = Gemma4ForConditionalGeneration.hf_to_vllm_mapper
    audio_tower = None

    def __init__(self, config, loads):
        super().__init__()
        self.language_model = CausalLM(config, loads)
        self.vision_tower, self.embed_vision = Consumer(), Consumer()

    def load_weights(self, weights):
        # Looked up at call time: a load_weights patches wrapped is the one that runs.
        return Gemma4ForConditionalGeneration.load_weights(self, weights)


def vllm_loads(model_dir: Path) -> dict[str, list]:
    """param name -> [(args, kwargs, tensor)] for every load vLLM's Gemma 4 code makes from the checkpoint."""
    from transformers import AutoConfig

    ckpt = Checkpoint(model_dir)
    loads: dict[str, list] = defaultdict(list)
    model = Multimodal(AutoConfig.from_pretrained(model_dir).get_text_config(), loads)
    model.load_weights((k, ckpt.get(k)) for k in ckpt.tensors)
    return loads


def expert_loads(loads, layer: int, param: str) -> dict[tuple[int, str], torch.Tensor]:
    """(expert, shard) -> tensor for one FusedMoE parameter, as vLLM's FusedMoE weight loader would get them."""
    out = {}
    for _, kw, w in loads[f"layers.{layer}.moe.experts.routed_experts.{param}"]:
        out[kw["expert_id"], kw["shard_id"]] = w
    return out


# --- tests --------------------------------------------------------------------------------------------


def test_clean_checkpoint_loads_every_expert_tensor(quantized: Path):
    assert patches.apply(quantized) == [] and patches._plan is None
    loads = vllm_loads(quantized)
    for layer in (0, 1):
        for param, shards in (("w13", ("w1", "w3")), ("w2", ("w2",))):
            for suffix in QUANT_SUFFIXES:
                got = expert_loads(loads, layer, f"{param}_{suffix}")
                assert set(got) == {(e, s) for e in range(NUM_EXPERTS) for s in shards}, (layer, param, suffix)
        scale_2 = expert_loads(loads, layer, "w13_weight_scale_2")
        assert all(torch.equal(scale_2[e, "w1"], scale_2[e, "w3"]) for e in range(NUM_EXPERTS))
    # q, k and (k_eq_v: k copied as) v all reach qkv_proj in the full-attention layer.
    assert sorted(args[0] for args, _, _ in loads["layers.1.self_attn.qkv_proj.weight_scale_2"]) == ["k", "q", "v"]


def test_other_checkpoints_are_left_alone(tiny_model_dir: Path, quantized: Path, tmp_path: Path):
    assert patches.apply(tiny_model_dir) == []  # BF16
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    assert patches.apply(fp8) == []
    dummy = tmp_path / "dummy"  # load_format="dummy": a config and no weights
    dummy.mkdir()
    shutil.copy(quantized / "config.json", dummy)
    assert patches.apply(dummy) == []


def test_many_repairs_of_a_kind_make_one_line():
    findings = [doctor.Finding("missing_input_scale", f"m{i}", "no input_scale", repair="fill") for i in range(5)]
    lines = patches._summary("ckpt", findings)
    assert lines == ["ckpt: 5 modules with missing_input_scale, e.g. m0: no input_scale; repaired while loading: fill"]


def test_scale_mismatch_and_missing_input_scale_repaired_while_loading(quantized: Path, tmp_path: Path):
    bad = plant(quantized, tmp_path / "bad", repairable_defects)
    unpatched = vllm_loads(bad)
    scale_2 = expert_loads(unpatched, 0, "w13_weight_scale_2")
    assert not torch.equal(scale_2[2, "w1"], scale_2[2, "w3"])  # vLLM would dequantize up with the gate's scale
    assert (3, "w1") not in expert_loads(unpatched, 0, "w13_input_scale")  # left uninitialized

    lines = patches.apply(bad)
    assert len(lines) == 2
    assert "experts.2.gate_proj+up_proj" in lines[0] and "requantize" in lines[0]
    assert "experts.3.gate_proj: no input_scale" in lines[1]
    loads = vllm_loads(bad)
    scale_2 = expert_loads(loads, 0, "w13_weight_scale_2")
    assert torch.equal(scale_2[2, "w1"], scale_2[2, "w3"])
    weight, block = expert_loads(loads, 0, "w13_weight"), expert_loads(loads, 0, "w13_weight_scale")
    clean = Checkpoint(quantized)
    for shard, proj in (("w1", "gate_proj"), ("w3", "up_proj")):
        # What vLLM computes with (one global scale for the expert's w13) equals the clean checkpoint's weights.
        as_vllm = codec.dequantize(weight[2, shard], block[2, shard], scale_2[2, "w1"])
        expected = codec.dequantize(
            *(clean.get(f"{EXP}.2.{proj}.{s}") for s in ("weight", "weight_scale", "weight_scale_2"))
        )
        assert torch.equal(as_vllm, expected)
    assert {e for e, _ in expert_loads(loads, 0, "w13_input_scale")} == set(range(NUM_EXPERTS))


def test_older_vllm_without_expert_key_mapping(quantized: Path, tmp_path: Path, monkeypatch):
    """Simulates a vLLM whose loader lacks the `.experts.<E>` -> `.moe.experts.<E>` mapping."""
    hf_named = plant(
        quantized,
        tmp_path / "hf",
        lambda t: [
            t.__setitem__(k.replace(".moe.experts.", ".experts."), t.pop(k))
            for k in [k for k in t if ".moe.experts." in k]
        ],
    )
    assert patches.apply(hf_named) == []  # vLLM 0.26 maps both forms
    monkeypatch.setattr(gemma4, "_remap_gemma4_expert_weight_name", lambda name: name)
    assert expert_loads(vllm_loads(hf_named), 0, "w2_weight") == {}  # silently dropped
    lines = patches.apply(hf_named)
    assert len(lines) == 1 and "renamed to `.moe.experts.<E>.`" in lines[0]
    assert len(expert_loads(vllm_loads(hf_named), 0, "w2_weight")) == NUM_EXPERTS


def test_unrepairable_checkpoint_is_refused(quantized: Path, tmp_path: Path):
    bad = plant(
        quantized,
        tmp_path / "bad",
        lambda t: t.__setitem__(f"{EXP}.6.up_proj.scale", t.pop(f"{EXP}.6.up_proj.weight_scale_2")),
    )
    with pytest.raises(patches.CheckpointError, match=r"(?s)\[missing\].*experts\.6\.up_proj\.weight_scale_2.*--fix"):
        patches.apply(bad)
    assert patches._plan is None


def test_config_only_repair_is_refused(quantized: Path, tmp_path: Path):
    bad = plant(quantized, tmp_path / "bad", lambda t: None)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["ignore"].remove("model.embed_vision*")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(patches.CheckpointError, match="ignore list"):
        patches.apply(bad)


def test_spawned_engine_would_miss_the_repairs(quantized: Path, tmp_path: Path, monkeypatch):
    bad = plant(quantized, tmp_path / "bad", repairable_defects)
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    with pytest.raises(patches.CheckpointError, match="spawn"):
        patches.apply(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("marlin", "marlin"), ("flashinfer-cutlass", "flashinfer_cutlass"), ("CUTLASS", "cutlass")],
)
def test_linear_backend_from_env(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("VLLM_NVFP4_GEMM_BACKEND", raising=False)
    else:
        monkeypatch.setenv("VLLM_NVFP4_GEMM_BACKEND", value)
    assert patches.linear_backend_from_env() == expected


def test_linear_backend_from_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("VLLM_NVFP4_GEMM_BACKEND", "warp-drive")
    with pytest.raises(ValueError, match="warp_drive"):
        patches.linear_backend_from_env()
