"""Sharded safetensors in and out, and the Gemma 4 key names the quantizer, doctor and patches share.

Tensors are read one at a time (headers are parsed without loading anything), so a 26B checkpoint is
never held in memory; `ShardWriter` writes what it is given in shards of bounded size.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# The four tensors of an NVFP4 module as ModelOpt names them, with the dtype and rank vLLM expects.
WEIGHT, BLOCK_SCALE, GLOBAL_SCALE, INPUT_SCALE = "weight", "weight_scale", "weight_scale_2", "input_scale"
QUANT_SUFFIXES = (WEIGHT, BLOCK_SCALE, GLOBAL_SCALE, INPUT_SCALE)
QUANT_DTYPES = {WEIGHT: "U8", BLOCK_SCALE: "F8_E4M3", GLOBAL_SCALE: "F32", INPUT_SCALE: "F32"}
TORCH_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I32": torch.int32,
    "I64": torch.int64,
}

# Shards that vLLM fuses into one kernel and so must share one global scale: attention q/k/v
# (qkv_proj) and gate/up (the dense MLP's gate_up_proj, each expert's w13).
FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# A per-expert module: `<layer>.experts.<E>.<proj>` as transformers names the block, or
# `<layer>.moe.experts.<E>.<proj>` as vLLM's Gemma 4 model does.
EXPERT_RE = re.compile(r"^(?P<layer>.+\.layers\.\d+)\.(?P<moe>moe\.)?experts\.(?P<expert>\d+)\.(?P<proj>\w+)$")
# Fused 3-D expert tensors: `<layer>.experts.gate_up_proj` [E, 2I, H] and `<layer>.experts.down_proj` [E, H, I].
FUSED_EXPERTS_RE = re.compile(r"^(?P<layer>.+\.layers\.\d+)\.(?:moe\.)?experts\.(?P<proj>gate_up_proj|down_proj)$")
CONFIG_FILES = ("config.json", "hf_quant_config.json")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors name: "BF16", "U8", "F8_E4M3", ...
    shape: tuple[int, ...]


def read_header(file: Path) -> dict[str, TensorInfo]:
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {k: TensorInfo(file, v["dtype"], tuple(v["shape"])) for k, v in header.items()}


class Checkpoint:
    """A Hugging Face checkpoint folder: config plus lazily read safetensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config: dict = json.loads((self.path / "config.json").read_text())
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            files = sorted({self.path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {self.path}")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self.tensors.update(read_header(file))
        self._handles: dict[Path, object] = {}

    def get(self, key: str) -> torch.Tensor:
        file = self.tensors[key].file
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_tensor(key)

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    @property
    def quant_config(self) -> dict | None:
        """The ModelOpt config as vLLM reads it: config.json's `quantization_config`, else hf_quant_config.json."""
        if "quantization_config" in self.config:
            return self.config["quantization_config"]
        legacy = self.path / "hf_quant_config.json"
        return json.loads(legacy.read_text()) if legacy.exists() else None

    @property
    def ignore(self) -> list[str]:
        qc = self.quant_config or {}
        return list(qc["quantization"].get("exclude_modules", []) if "quantization" in qc else qc.get("ignore", []))

    def text_prefix(self) -> str:
        """Where the text decoder layers live: `model.language_model.` for Gemma4ForConditionalGeneration."""
        counts: dict[str, int] = {}
        for key in self.tensors:
            m = re.match(r"^(.*?)layers\.\d+\.", key)
            if m and not re.search(r"vision|audio", m.group(1)):
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        if not counts:
            raise ValueError(f"{self.path}: no decoder layers found")
        return max(counts, key=counts.__getitem__)


def split_key(key: str) -> tuple[str, str]:
    """(module, tensor suffix); the suffix is "" for bare parameters such as fused expert tensors."""
    for suffix in (GLOBAL_SCALE, BLOCK_SCALE, INPUT_SCALE, WEIGHT, "bias"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, ""


def fused_group(module: str) -> tuple[str, tuple[str, ...]] | None:
    """(group id, member modules) when vLLM fuses this module with siblings, e.g. q_proj into qkv_proj."""
    parent, _, leaf = module.rpartition(".")
    for members in FUSED_SHARDS:
        if leaf in members:
            return f"{parent}.{'+'.join(members)}", tuple(f"{parent}.{m}" for m in members)
    return None


def expert_block(module: str) -> tuple[str, str] | None:
    """(transformers name, vLLM name) of the MoE block an expert module belongs to: exclusion is per block in vLLM."""
    m = EXPERT_RE.match(module)
    if not m:
        return None
    return f"{m['layer']}.experts", f"{m['layer']}.moe.experts"


def is_excluded(module: str, patterns: list[str]) -> bool:
    """ModelOpt's reading of an ignore list: wildcard patterns over module names, `X*` covering X's children."""
    names = expert_block(module) or (module,)
    return any(fnmatch(n, p) or n == p or n.startswith(p + ".") for n in names for p in patterns)


class ShardWriter:
    """Collects tensors into safetensors shards of at most `max_bytes` and writes the index at the end."""

    def __init__(self, out: Path, max_bytes: int = 4 << 30):
        self.out = Path(out)
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size

    def _flush(self) -> None:
        part = self.out / f".part-{len(self._shards):05d}.safetensors"
        save_file(self._pending, part, metadata={"format": "pt"})
        self._shards.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (part, keys) in enumerate(self._shards, 1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            part.rename(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer, processor, chat template, generation config: everything but weights and quant configs."""
    import shutil

    for f in Path(src).iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".safetensors.index.json"))
            and f.name not in CONFIG_FILES
        ):
            shutil.copy2(f, Path(out) / f.name)


def quant_config(ignore: list[str]) -> dict:
    """config.json's `quantization_config` for an NVFP4 checkpoint (the form vLLM reads first)."""
    from nvfp4.codec import GROUP

    return {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": GROUP,
        "ignore": ignore,
        "producer": {"name": "nvfp4.quantize"},
    }


def write_configs(out: Path, config: dict, qc: dict) -> None:
    """config.json with `qc` as its quantization_config, and the same in the legacy hf_quant_config.json."""
    out = Path(out)
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qc}, indent=2) + "\n")
    legacy = {
        "producer": qc.get("producer", {}),
        "quantization": {
            "quant_algo": qc["quant_algo"],
            "kv_cache_quant_algo": None,
            "group_size": qc["group_size"],
            "exclude_modules": qc["ignore"],
        },
    }
    (out / "hf_quant_config.json").write_text(json.dumps(legacy, indent=2) + "\n")
