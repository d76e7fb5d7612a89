"""Gemma 4 BF16 (fused 3-D experts) -> NVFP4 in the per-expert ModelOpt layout vLLM loads.

    python -m nvfp4.quantize --model IN --out OUT [--calib-samples N] [--exclude PATTERN ...] [--device cuda]

Quantized: every linear layer of the text decoder (attention, dense MLP) and every expert, written as
`<layer>.moe.experts.<E>.{gate,up,down}_proj.{weight,weight_scale,weight_scale_2,input_scale}`; vLLM 0.26
maps this name and the `<layer>.experts.<E>` form alike. Kept BF16 and listed in the `ignore` list: router,
embeddings, lm_head, vision/audio towers, and whatever --exclude matches (ModelOpt wildcards over module
names; a MoE block is `<layer>.experts`). Shards vLLM fuses (q/k/v, gate/up) share one global scale.
`input_scale` comes from a calibration pass (see nvfp4.calibrate). The checkpoint is read and written one
decoder layer at a time.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from nvfp4 import codec
from nvfp4.calibrate import Calibration, calibrate, expert_amax_fallback
from nvfp4.layout import (
    FUSED_EXPERTS_RE,
    Checkpoint,
    ShardWriter,
    copy_side_files,
    fused_group,
    is_excluded,
    quant_config,
    split_key,
    write_configs,
)

DEFAULT_CALIB_SAMPLES = 32


def default_exclude(prefix: str) -> list[str]:
    return [
        "lm_head",
        f"{prefix}embed_tokens*",
        f"{prefix}layers.*.router*",
        "model.vision_tower*",
        "model.embed_vision*",
        "model.audio_tower*",
        "model.embed_audio*",
    ]


def quantize_checkpoint(
    src_dir: Path,
    out_dir: Path,
    *,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    exclude: list[str] | None = None,
    device: str | None = None,
) -> Path:
    src, out = Path(src_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    ckpt = Checkpoint(src)
    if ckpt.quant_config is not None:
        raise ValueError(f"{src} is already quantized ({ckpt.quant_config.get('quant_method')})")
    prefix = ckpt.text_prefix()
    ignore = default_exclude(prefix) + list(exclude or [])
    linear, moe_layers, extra_ignore = select(ckpt, prefix, ignore)
    ignore += extra_ignore

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    calib = calibrate(ckpt, calib_samples, device)

    from transformers.activations import ACT2FN

    act = ACT2FN[ckpt.text_config.get("hidden_activation", "gelu_pytorch_tanh")]
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out)
    by_layer: dict[int, list[str]] = defaultdict(list)
    layer_re = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.")
    for key in ckpt.tensors:
        m = layer_re.match(key)
        if m:
            by_layer[int(m.group(1))].append(key)
        else:
            writer.add(key, ckpt.get(key))
    start = time.monotonic()
    for n, (index, keys) in enumerate(sorted(by_layer.items()), 1):
        layer = f"{prefix}layers.{index}"
        _quantize_layer(ckpt, keys, linear, layer in moe_layers, calib, act, _Writer(writer, device))
        print(f"quantized layer {n}/{len(by_layer)} ({time.monotonic() - start:.0f} s)", flush=True)
    writer.finish()
    write_configs(out, ckpt.config, quant_config(ignore))
    copy_side_files(src, out)
    print(f"wrote {out}", flush=True)
    return out


def select(ckpt: Checkpoint, prefix: str, ignore: list[str]) -> tuple[set[str], set[str], list[str]]:
    """(linear modules to quantize, MoE layers to quantize, ignore entries to add for what stays BF16)."""
    linear, moe_layers, extra = set(), set(), []
    for key, info in ckpt.tensors.items():
        module, suffix = split_key(key)
        fused = FUSED_EXPERTS_RE.match(key)
        if fused and key.startswith(prefix):
            layer = fused["layer"]
            if is_excluded(f"{layer}.experts.0.gate_proj", ignore):
                extra.append(f"{layer}.moe.experts")  # the name vLLM matches the block against
            else:
                moe_layers.add(layer)
        elif suffix == "weight" and len(info.shape) == 2:
            if key.startswith(f"{prefix}layers.") and not is_excluded(module, ignore):
                linear.add(module)
            elif not is_excluded(module, ignore):
                extra.append(module)  # a BF16 linear vLLM would otherwise expect in NVFP4
    for module in linear:
        group = fused_group(module)
        split = group and [m for m in group[1] if f"{m}.weight" in ckpt.tensors and m not in linear]
        if split:
            raise ValueError(f"--exclude splits {group[0]}: vLLM runs these shards as one layer; exclude all or none")
    return linear, moe_layers, sorted(set(extra))


class _Writer:
    """Encodes modules on `device` (a GPU makes a 26B run take minutes, not an hour) and hands them to the shards."""

    def __init__(self, shards: ShardWriter, device: str):
        self.shards, self.device = shards, device

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.shards.add(key, tensor)

    def module(self, module: str, w: torch.Tensor, w_amax, x_amax: float) -> None:
        packed, block_scale, global_scale = codec.quantize(w.to(self.device), w_amax)
        self.add(f"{module}.weight", packed.cpu())
        self.add(f"{module}.weight_scale", block_scale.cpu())
        self.add(f"{module}.weight_scale_2", global_scale.cpu())
        self.add(f"{module}.input_scale", codec.scale_from_amax(x_amax))


def _quantize_layer(
    ckpt: Checkpoint, keys: list[str], linear: set[str], moe: bool, calib: Calibration, act, writer: _Writer
) -> None:
    done: set[str] = set()
    fused_experts = {}
    for key in keys:
        module, _ = split_key(key)
        if module in linear:
            if module not in done:
                group = fused_group(module)
                members = [m for m in group[1] if m in linear] if group else [module]
                _quantize_group(ckpt, members, calib, writer)
                done.update(members)
        elif moe and (m := FUSED_EXPERTS_RE.match(key)):
            fused_experts[m["proj"]] = key
            layer = m["layer"]
        else:
            writer.add(key, ckpt.get(key))
    if fused_experts:
        gate_up, down = ckpt.get(fused_experts["gate_up_proj"]), ckpt.get(fused_experts["down_proj"])
        _quantize_experts(layer, gate_up, down, calib, act, writer)


def _quantize_group(ckpt: Checkpoint, members: list[str], calib: Calibration, writer: _Writer) -> None:
    """Fused shards share the global scale (their common amax) and see the same input."""
    weights = {m: ckpt.get(f"{m}.weight").float() for m in members}
    w_amax = max(w.abs().max() for w in weights.values())
    seen = [calib.amax[m] for m in members if m in calib.amax]
    if not seen:
        raise RuntimeError(f"calibration never ran {', '.join(members)}")
    for m, w in weights.items():
        writer.module(m, w, w_amax, max(seen))


def _quantize_experts(
    layer: str, gate_up: torch.Tensor, down: torch.Tensor, calib: Calibration, act, writer: _Writer
) -> None:
    inter = gate_up.shape[1] // 2
    unreached = []
    for e in range(gate_up.shape[0]):
        gate, up = gate_up[e, :inter].float(), gate_up[e, inter:].float()
        if calib.expert_tokens[layer][e]:
            x_in, x_mid = calib.amax[f"{layer}.experts.{e}.gate_proj"], calib.amax[f"{layer}.experts.{e}.down_proj"]
        else:
            x_in, x_mid = expert_amax_fallback(calib, layer, gate, up, act)
            unreached.append(e)
        base = f"{layer}.moe.experts.{e}"
        shared = torch.maximum(gate.abs().max(), up.abs().max())
        writer.module(f"{base}.gate_proj", gate, shared, x_in)
        writer.module(f"{base}.up_proj", up, shared, x_in)
        w = down[e].float()
        writer.module(f"{base}.down_proj", w, w.abs().max(), x_mid)
    if unreached:
        print(f"{layer}: experts {unreached} got no calibration token; their input scales are estimated", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvfp4.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="BF16 Gemma 4 checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the NVFP4 checkpoint")
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, help="calibration chats")
    parser.add_argument(
        "--exclude",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="keep matching modules BF16 (ModelOpt wildcard over module names)",
    )
    parser.add_argument("--device", help="where calibration runs (default: cuda when available)")
    args = parser.parse_args(argv)
    quantize_checkpoint(
        args.model, args.out, calib_samples=args.calib_samples, exclude=args.exclude, device=args.device
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
