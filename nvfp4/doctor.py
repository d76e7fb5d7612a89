"""Check an NVFP4 Gemma 4 checkpoint against what vLLM's loader expects; optionally write a repaired copy.

    python -m nvfp4.doctor CKPT [--json] [--fix OUT]

Reads safetensors headers, and tensors only where a check needs values (global and input scales, and the
tensors a repair rewrites). Exit status: 0 clean, 1 problems (with --fix: problems it could not repair),
2 unreadable. --fix writes a full repaired copy to OUT and never touches CKPT; it refuses, writing nothing,
when a problem has no repair:
- shards vLLM fuses (q/k/v, gate/up, an expert's gate/up) with different global scales: the ones below the
  largest are requantized to it, so vLLM's single scale is right for all;
- missing `input_scale`: an expert takes the largest input scale of the same input among the layer's other
  experts; a linear shard takes its fused siblings' (they read the same input);
- scales in a wrong dtype: cast, when the cast is exact;
- quantized modules the ignore list excludes: dequantized to the checkpoint dtype;
- BF16 modules vLLM would expect quantized: added to the ignore list.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvfp4 import codec
from nvfp4.layout import (
    BLOCK_SCALE,
    EXPERT_RE,
    FUSED_EXPERTS_RE,
    GLOBAL_SCALE,
    INPUT_SCALE,
    QUANT_DTYPES,
    QUANT_SUFFIXES,
    TORCH_DTYPES,
    WEIGHT,
    Checkpoint,
    ShardWriter,
    copy_side_files,
    fused_group,
    is_excluded,
    split_key,
    write_configs,
)

SCALE_RTOL = 1e-6  # global scales closer than this count as equal (vLLM's own check is torch.allclose)
# Modules vLLM 0.26 never quantizes in Gemma 4, whatever the ignore list says: embeddings, the router's
# GateLinear, and the vision tower (hard-coded in ModelOptQuantConfigBase.get_quant_method).
NEVER_QUANTIZED = ("embed_tokens", ".router.", "vision_tower.")


@dataclass
class UnitRepair:
    """All tensor repairs of one unit (a module, or the shards vLLM fuses), applied in this order."""

    reads: list[str]  # the unit's existing keys; the repair's output replaces them
    casts: dict[str, torch.dtype] = field(default_factory=dict)
    requantize: dict[str, float] = field(default_factory=dict)  # module -> the shared global scale
    fills: dict[str, float] = field(default_factory=dict)  # missing input_scale key -> value
    dequantize: list[str] = field(default_factory=list)  # modules to write back in `dtype`
    dtype: torch.dtype = torch.bfloat16

    def build(self, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        t = {k: get(k) for k in self.reads}
        for k, dtype in self.casts.items():
            t[k] = t[k].view(dtype) if t[k].dtype == torch.int8 else t[k].to(dtype)
        for m, scale in self.requantize.items():
            w = codec.dequantize(t[f"{m}.{WEIGHT}"], t[f"{m}.{BLOCK_SCALE}"], t[f"{m}.{GLOBAL_SCALE}"])
            t[f"{m}.{WEIGHT}"], t[f"{m}.{BLOCK_SCALE}"], _ = codec.quantize(w, codec.amax_from_scale(scale))
            t[f"{m}.{GLOBAL_SCALE}"] = torch.tensor(scale, dtype=torch.float32)
        for k, value in self.fills.items():
            t[k] = torch.tensor(value, dtype=torch.float32)
        for m in self.dequantize:
            w = codec.dequantize(t.pop(f"{m}.{WEIGHT}"), t.pop(f"{m}.{BLOCK_SCALE}"), t.pop(f"{m}.{GLOBAL_SCALE}"))
            t.pop(f"{m}.{INPUT_SCALE}", None)
            t[f"{m}.{WEIGHT}"] = w.to(self.dtype)
        return t


@dataclass
class Finding:
    kind: str  # config, layout, missing, unexpected, dtype, shape, scale_mismatch, missing_input_scale, exclusion
    module: str
    message: str
    repair: str = ""  # what --fix does; "" when it cannot
    in_stream: bool = True  # the repair only rewrites tensors (patches can do it while vLLM loads)


@dataclass
class Report:
    path: Path
    config: str = ""
    layout: str = ""
    findings: list[Finding] = field(default_factory=list)
    units: dict[str, UnitRepair] = field(default_factory=dict)  # unit id -> tensor repairs
    ignore_add: list[str] = field(default_factory=list)  # config repair
    quantized: bool = False

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def repairable(self) -> bool:
        return all(f.repair for f in self.findings)

    def text(self) -> str:
        lines = [f"nvfp4 doctor: {self.path}", f"  config: {self.config}", f"  layout: {self.layout}"]
        if self.ok:
            return "\n".join([*lines, "  clean"])
        lines.append(f"  {len(self.findings)} problem(s):")
        for f in self.findings:
            lines.append(f"  - [{f.kind}] {f.module}: {f.message}")
            lines.append(f"      fix: {f.repair}" if f.repair else "      fix: none (needs a re-export)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "config": self.config,
            "layout": self.layout,
            "ok": self.ok,
            "repairable": self.repairable,
            "findings": [
                {"kind": f.kind, "module": f.module, "message": f.message, "repair": f.repair} for f in self.findings
            ],
        }


def diagnose(path: Path) -> Report:
    """Everything the doctor finds in the checkpoint at `path` (raises OSError/ValueError when unreadable)."""
    ckpt = Checkpoint(path)
    report = Report(ckpt.path)
    modules: dict[str, dict[str, str]] = {}  # quantized module -> suffix -> key
    for key in ckpt.tensors:
        module, suffix = split_key(key)
        if suffix in QUANT_SUFFIXES:
            modules.setdefault(module, {})[suffix] = key
    modules = {
        m: s
        for m, s in modules.items()
        if BLOCK_SCALE in s or GLOBAL_SCALE in s or (WEIGHT in s and ckpt.tensors[s[WEIGHT]].dtype in ("U8", "I8"))
    }
    report.quantized = bool(modules)
    w4a4 = _check_config(ckpt, report)
    _check_keys(ckpt, modules, report)
    for module in sorted(modules):
        _check_module(ckpt, module, modules, report)
    _check_scales(ckpt, modules, report, w4a4)
    _check_exclusions(ckpt, modules, report)
    return report


def _unit(report: Report, ckpt: Checkpoint, modules: dict[str, dict[str, str]], module: str) -> UnitRepair:
    group = fused_group(module)
    members = [m for m in group[1] if m in modules] if group else [module]
    uid = group[0] if group else module
    if uid not in report.units:
        reads = [k for m in members for k in modules[m].values()]
        report.units[uid] = UnitRepair(reads, dtype=_model_dtype(ckpt))
    return report.units[uid]


def _model_dtype(ckpt: Checkpoint) -> torch.dtype:
    dtype = ckpt.text_config.get("dtype") or ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    return {"float16": torch.float16, "float32": torch.float32}.get(dtype, torch.bfloat16)


def _check_config(ckpt: Checkpoint, report: Report) -> bool:
    """Describes the quantization config; returns whether activations are quantized (input scales needed)."""
    qc = ckpt.quant_config
    if qc is None:
        report.config = "no quantization_config and no hf_quant_config.json"
        if report.quantized:
            report.findings.append(Finding("config", "config.json", "NVFP4 tensors but no quantization config"))
        return False
    source = "config.json quantization_config" if "quantization_config" in ckpt.config else "hf_quant_config.json"
    inner = qc.get("quantization", qc)
    method, algo, group = (
        qc.get("quant_method", "modelopt (legacy file)"),
        inner.get("quant_algo"),
        inner.get("group_size"),
    )
    report.config = f"{source}: {method} {algo}, group_size {group}, {len(ckpt.ignore)} ignore entries"
    if not str(method).startswith("modelopt") or str(algo).upper() not in ("NVFP4", "W4A16_NVFP4"):
        report.findings.append(Finding("config", source, f"not a ModelOpt NVFP4 config: {method} {algo}"))
    if group not in (None, codec.GROUP):
        report.findings.append(Finding("config", source, f"group_size {group}, NVFP4 needs {codec.GROUP}"))
    return str(algo).upper() == "NVFP4"


def _check_keys(ckpt: Checkpoint, modules: dict[str, dict[str, str]], report: Report) -> None:
    """Every key must be one transformers' model has (experts may be split per expert), and none missing."""
    expected = _expected_keys(ckpt)
    layers: dict[str, dict[str, set[int]]] = {}  # MoE layer -> form -> experts seen
    covered = set()
    for key in ckpt.tensors:
        module, suffix = split_key(key)
        m = EXPERT_RE.match(module)
        if m and suffix in QUANT_SUFFIXES and m["proj"] in ("gate_proj", "up_proj", "down_proj"):
            fused = f"{m['layer']}.experts.{'down_proj' if m['proj'] == 'down_proj' else 'gate_up_proj'}"
            if fused in expected:
                covered.add(fused)
                form = ".moe.experts" if m["moe"] else ".experts"
                seen = layers.setdefault(m["layer"], {}).setdefault(form, set())
                if suffix == WEIGHT:
                    seen.add(int(m["expert"]))
                continue
        if key in expected or (module in modules and f"{module}.{WEIGHT}" in expected):
            covered.add(key if key in expected else f"{module}.{WEIGHT}")
        else:
            report.findings.append(
                Finding("unexpected", key, "no module of the model has this tensor: vLLM would skip it")
            )
    for key in sorted(expected - covered):
        report.findings.append(Finding("missing", key, "the model has this tensor, the checkpoint does not"))

    fused: dict[str, set[str]] = {}  # layer -> dtypes of its fused 3-D expert tensors
    for key, info in ckpt.tensors.items():
        if m := FUSED_EXPERTS_RE.match(key):
            fused.setdefault(m["layer"], set()).add(info.dtype)
    num_experts = ckpt.text_config.get("num_experts") or 0
    forms = sorted({f for forms in layers.values() for f in forms})
    parts = []
    if layers:
        parts.append(f"per-expert MoE ({' and '.join(f'`{f}.<E>`' for f in forms)}, {len(layers)} layers)")
    if fused:
        parts.append(f"fused 3-D experts in {len(fused)} layers")
    report.layout = f"{', '.join(parts) or 'no MoE experts'}; {len(modules)} quantized modules"
    for layer, seen in layers.items():
        for e in sorted(set(range(num_experts)) - set().union(*seen.values())):
            report.findings.append(Finding("missing", f"{layer}.experts.{e}", "expert has no weights"))
    for layer, dtypes in sorted(fused.items()):
        if "U8" in dtypes:
            message = "quantized fused 3-D experts: vLLM splits the weight per expert but not its scales"
            report.findings.append(Finding("layout", f"{layer}.experts", message))


def _expected_keys(ckpt: Checkpoint) -> set[str]:
    """The state-dict keys of transformers' model for this config (built on the meta device), tied copies left out."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ckpt.path)
    cls = getattr(transformers, (config.architectures or ["Gemma4ForConditionalGeneration"])[0])
    with torch.device("meta"):
        model = cls(config)
    keys = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False) or config.get_text_config().tie_word_embeddings:
        keys -= set(getattr(model, "_tied_weights_keys", None) or ())
    return keys


def _check_module(ckpt: Checkpoint, module: str, modules: dict[str, dict[str, str]], report: Report) -> None:
    suffixes = modules[module]
    for suffix in (WEIGHT, BLOCK_SCALE, GLOBAL_SCALE):
        if suffix not in suffixes:
            report.findings.append(Finding("missing", f"{module}.{suffix}", "NVFP4 module without this tensor"))
    for suffix, key in suffixes.items():
        have, want = ckpt.tensors[key].dtype, QUANT_DTYPES[suffix]
        if have == want:
            continue
        exact = _cast_is_exact(ckpt, key, want)
        finding = Finding("dtype", key, f"{have}, vLLM expects {want}")
        if exact:
            finding.repair = f"cast to {want} (exact)"
            _unit(report, ckpt, modules, module).casts[key] = TORCH_DTYPES[want]
        report.findings.append(finding)
    shapes = {s: ckpt.tensors[k].shape for s, k in suffixes.items()}
    w = shapes.get(WEIGHT)
    if w is not None and len(w) != 2:
        report.findings.append(Finding("shape", f"{module}.{WEIGHT}", f"shape {list(w)}, expected [out, in/2]"))
    elif w is not None and BLOCK_SCALE in shapes and shapes[BLOCK_SCALE] != (w[0], w[1] * 2 // codec.GROUP):
        report.findings.append(
            Finding(
                "shape",
                f"{module}.{BLOCK_SCALE}",
                f"shape {list(shapes[BLOCK_SCALE])}, weight {list(w)} needs {[w[0], w[1] * 2 // codec.GROUP]}",
            )
        )
    for suffix in (GLOBAL_SCALE, INPUT_SCALE):
        if suffix in shapes and _numel(shapes[suffix]) != 1:
            report.findings.append(
                Finding("shape", f"{module}.{suffix}", f"shape {list(shapes[suffix])}, expected a scalar")
            )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _cast_is_exact(ckpt: Checkpoint, key: str, want: str) -> bool:
    t = ckpt.get(key)
    if want == "U8":
        return t.dtype == torch.int8
    if not t.dtype.is_floating_point:
        return False
    return bool(torch.equal(t.to(TORCH_DTYPES[want]).to(t.dtype), t))


@functools.cache  # fallbacks read the same scales again and again
def _scale(ckpt: Checkpoint, key: str) -> float:
    return float(ckpt.get(key).float().reshape(-1)[0])


def _check_scales(ckpt: Checkpoint, modules: dict[str, dict[str, str]], report: Report, w4a4: bool) -> None:
    groups = {}
    for module in modules:
        group = fused_group(module)
        if group:
            groups[group[0]] = [m for m in group[1] if m in modules and GLOBAL_SCALE in modules[m]]
    for gid, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        scales = {m: _scale(ckpt, modules[m][GLOBAL_SCALE]) for m in members}
        top = max(scales.values())
        if all(abs(s - top) <= SCALE_RTOL * top for s in scales.values()):
            continue
        expert = EXPERT_RE.match(members[0])
        # vLLM's MoE keeps w13_weight_scale_2[:, 0] (the gate's); its fused linears keep the largest shard's.
        used, chosen = (scales[members[0]], "the gate's") if expert else (top, "the largest")
        errors = ", ".join(f"{m.rsplit('.', 1)[1]} {abs(used / s - 1):.1%}" for m, s in scales.items() if s != used)
        unit = _unit(report, ckpt, modules, members[0])
        unit.requantize.update({m: top for m, s in scales.items() if abs(s - top) > SCALE_RTOL * top})
        report.findings.append(
            Finding(
                "scale_mismatch",
                gid,
                f"global scales {', '.join(f'{s:.4g}' for s in scales.values())} differ; vLLM keeps {chosen} for "
                f"the fused layer, so these shards would be off by (relative weight error): {errors}",
                repair=f"requantize to the shared global scale {top:.4g}",
            )
        )
    if not w4a4:
        return
    for module, suffixes in sorted(modules.items()):
        if INPUT_SCALE in suffixes:
            continue
        value, source = _input_scale_fallback(ckpt, module, modules)
        finding = Finding(
            "missing_input_scale",
            module,
            "no input_scale: vLLM leaves it uninitialized (unused by Marlin, wrong output with W4A4 kernels)",
        )
        if value is not None:
            _unit(report, ckpt, modules, module).fills[f"{module}.{INPUT_SCALE}"] = value
            finding.repair = f"input_scale {value:.4g} ({source})"
        report.findings.append(finding)


def _input_scale_fallback(
    ckpt: Checkpoint, module: str, modules: dict[str, dict[str, str]]
) -> tuple[float | None, str]:
    """The largest input scale among modules that read the same input: the layer's other experts, or fused siblings."""
    m = EXPERT_RE.match(module)
    if m:
        same_input = ("down_proj",) if m["proj"] == "down_proj" else ("gate_proj", "up_proj")
        layer = f"{m['layer']}."
        sources = [
            k
            for x, s in modules.items()
            if x.startswith(layer)
            and (e := EXPERT_RE.match(x))
            and e["proj"] in same_input
            and (k := s.get(INPUT_SCALE))
        ]
        what = "max over the layer's other experts"
    else:
        group = fused_group(module)
        sources = [modules[x][INPUT_SCALE] for x in (group[1] if group else ()) if INPUT_SCALE in modules.get(x, {})]
        what = "its fused siblings' input scale"
    if not sources:
        return None, ""
    return max(_scale(ckpt, k) for k in sources), what


def _check_exclusions(ckpt: Checkpoint, modules: dict[str, dict[str, str]], report: Report) -> None:
    ignore = ckpt.ignore
    if not report.quantized:
        return
    for module in sorted(modules):
        if not is_excluded(module, ignore):
            continue
        finding = Finding("exclusion", module, "quantized, but the ignore list excludes it: vLLM would expect BF16")
        if EXPERT_RE.match(module):
            finding.message += " (vLLM runs all experts of a layer as one block: fix the ignore list)"
        elif all(s in modules[module] for s in (WEIGHT, BLOCK_SCALE, GLOBAL_SCALE)):
            _unit(report, ckpt, modules, module).dequantize.append(module)
            finding.repair = "dequantize to BF16"
        report.findings.append(finding)
    for key, info in ckpt.tensors.items():
        module, suffix = split_key(key)
        fused = FUSED_EXPERTS_RE.match(key)
        if fused:
            module = f"{fused['layer']}.experts"
        elif suffix != WEIGHT or len(info.shape) != 2 or module in modules:
            continue
        if info.dtype in ("U8", "I8") or any(n in f"{module}." for n in NEVER_QUANTIZED):
            continue
        probe = f"{module}.0.gate_proj" if fused else module
        if not is_excluded(probe, ignore):
            name = f"{fused['layer']}.moe.experts" if fused else module
            if name in report.ignore_add:
                continue
            report.ignore_add.append(name)
            report.findings.append(
                Finding(
                    "exclusion",
                    module,
                    "BF16, but not in the ignore list: vLLM would expect NVFP4",
                    repair=f"add {name} to the ignore list",
                    in_stream=False,
                )
            )


def fix(report: Report, out: Path) -> None:
    """Write the checkpoint with every repair of `report` applied to `out` (a new folder)."""
    if not report.repairable:
        raise ValueError("some problems have no repair")
    out = Path(out)
    if out.resolve() == report.path.resolve():
        raise ValueError("--fix writes a copy: OUT must differ from the checkpoint")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(report.path)
    writer = ShardWriter(out)
    for key, value in repaired_tensors(ckpt, report, ((k, None) for k in ckpt.tensors)):
        writer.add(key, ckpt.get(key) if value is None else value)
    writer.finish()
    qc = dict(ckpt.quant_config or {})
    if "quantization" in qc:  # legacy hf_quant_config.json: rewrite in the config.json form
        inner = qc["quantization"]
        qc = {
            "quant_method": "modelopt",
            "quant_algo": inner["quant_algo"],
            "group_size": inner.get("group_size", codec.GROUP),
            "ignore": list(inner.get("exclude_modules", [])),
            "producer": qc.get("producer", {}),
        }
    qc["ignore"] = list(qc.get("ignore", [])) + report.ignore_add
    write_configs(out, ckpt.config, qc)
    copy_side_files(report.path, out)


def repaired_tensors(ckpt: Checkpoint, report: Report, stream):
    """Pass (key, tensor) pairs through, replacing each repaired unit's tensors with the unit's repair output.

    A unit is built from the checkpoint on disk when the stream first reaches one of its keys; keys the repair
    adds come right then, keys it drops never come. Keys outside every unit pass with their own tensor.
    """
    owner = {k: u for u in report.units.values() for k in u.reads}
    built: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in stream:
        unit = owner.get(key)
        if unit is None:
            yield key, tensor
            continue
        if id(unit) not in built:
            built[id(unit)] = unit.build(ckpt.get)
            yield from ((k, v) for k, v in built[id(unit)].items() if k not in unit.reads)
        if key in built[id(unit)]:
            yield key, built[id(unit)][key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvfp4.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fix", type=Path, metavar="OUT", help="write a repaired copy to OUT")
    args = parser.parse_args(argv)
    try:
        report = diagnose(args.ckpt)
    except (OSError, ValueError, KeyError) as e:
        print(f"nvfp4 doctor: cannot read {args.ckpt}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2) if args.json else report.text())
    if args.fix is None or report.ok:
        return 0 if report.ok else 1
    if not report.repairable:
        print(f"nvfp4 doctor: not writing {args.fix}: some problems have no repair", file=sys.stderr)
        return 1
    fix(report, args.fix)
    after = diagnose(args.fix)
    print(f"nvfp4 doctor: wrote {args.fix}\n{after.text()}", file=sys.stderr)
    return 0 if after.ok else 1


if __name__ == "__main__":
    sys.exit(main())
