"""Activation ranges for `input_scale`: chat prompts through the checkpoint's own tokenizer and model.

The text model is built on the meta device and each decoder layer is read from safetensors just before it
runs and dropped right after, so calibrating a 26B checkpoint holds one layer (plus embeddings) at a time.
Forward hooks record the absolute maximum of every linear layer's input; a hook on each MoE block records,
per expert, the maximum of the tokens routed to it and of its down-projection input (recomputed there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nvfp4.layout import Checkpoint

MAX_TOKENS = 512  # per sample
SAMPLE_ROWS = 256  # expert-input rows kept per layer to estimate unreached experts' down-projection range

# (user, assistant) turns across the kinds of text a chat model sees; combined into longer chats when
# more samples are asked for than there are turns.
TURNS = [
    ("What is the capital of Australia?", "The capital of Australia is Canberra, not Sydney."),
    (
        "Write a Python function that reverses a linked list.",
        "def reverse(head):\n    prev = None\n    while head:\n"
        "        head.next, prev, head = prev, head, head.next\n    return prev",
    ),
    ("Solve 3x + 7 = 22 step by step.", "Subtract 7 from both sides: 3x = 15. Divide by 3: x = 5."),
    ("Traduis en français : The weather is lovely today.", "Il fait très beau aujourd'hui."),
    (
        "Summarize the plot of Romeo and Juliet in two sentences.",
        "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings "
        "ends in both of their deaths, which reconciles the families.",
    ),
    (
        "Give me a JSON object describing a book.",
        '{"title": "Dune", "author": "Frank Herbert", "year": 1965, "genres": ["science fiction"]}',
    ),
    ("¿Cuántos días tiene un año bisiesto?", "Un año bisiesto tiene 366 días."),
    (
        "Explain recursion to a child.",
        "Recursion is when something is defined using a smaller copy of itself, like nesting dolls.",
    ),
    ("List three prime numbers greater than 100.", "101, 103 and 107."),
    ("What does HTTP status 404 mean?", "404 Not Found: the server could not find the requested resource."),
    ("用一句话介绍长城。", "长城是中国古代修建的绵延数千公里的防御工程。"),
    ("Write a haiku about autumn.", "Crimson leaves descend\nwhispering to the cold earth\nthe year exhales slow"),
    (
        "How do I undo the last git commit but keep the changes?",
        "Run `git reset --soft HEAD~1`; the changes stay staged.",
    ),
    ("Compute 17 * 23.", "17 * 23 = 391."),
    (
        "Was ist der Unterschied zwischen Wetter und Klima?",
        "Wetter beschreibt den kurzfristigen Zustand, Klima den langjährigen Durchschnitt.",
    ),
    (
        "Describe a cat in a photo sitting on a red car.",
        "A small grey cat sits on the hood of a shiny red car, its tail curled around its paws, looking at the camera.",
    ),
]


@dataclass
class Calibration:
    """Input absolute maxima, keyed by checkpoint module name (experts as `<layer>.experts.<E>.<proj>`)."""

    amax: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # MoE layer -> tokens routed per expert
    expert_input_amax: dict[str, float] = field(default_factory=dict)  # MoE layer -> over all tokens
    expert_input_sample: dict[str, torch.Tensor] = field(default_factory=dict)  # MoE layer -> [<=256, H]

    def _max(self, key: str, value: torch.Tensor) -> None:
        self.amax[key] = max(self.amax.get(key, 0.0), float(value))


def prompts(tokenizer, samples: int) -> list[list[int]]:
    """Token ids of `samples` chats, rendered by the tokenizer's chat template when it has one."""
    out = []
    for i in range(samples):
        turns = [TURNS[(i + 5 * k) % len(TURNS)] for k in range(1 + i // len(TURNS))]
        if tokenizer.chat_template:
            messages = [
                m
                for user, answer in turns
                for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})
            ]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        else:
            ids = tokenizer("\n".join(f"{u}\n{a}" for u, a in turns))["input_ids"]
        out.append(list(ids)[:MAX_TOKENS])
    return out


def calibrate(ckpt: Checkpoint, samples: int, device: torch.device | str = "cpu") -> Calibration:
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    if samples < 1:
        raise ValueError("calibration needs at least one sample")
    prefix = ckpt.text_prefix()
    text_config = AutoConfig.from_pretrained(ckpt.path).get_text_config()
    with torch.device("meta"):
        model = AutoModel.from_config(text_config, attn_implementation="sdpa")
    _materialize(model, ckpt, prefix, device)

    calib = Calibration()
    hooks = []
    for i, layer in enumerate(model.layers):
        name = f"{prefix}layers.{i}"
        hooks.append(layer.register_forward_pre_hook(_loader(ckpt, name, device)))
        hooks.append(layer.register_forward_hook(_unload))
        for sub, module in layer.named_modules():
            if isinstance(module, nn.Linear) and ".router." not in f".{sub}.":
                hooks.append(module.register_forward_pre_hook(_linear_hook(calib, f"{name}.{sub}")))
            elif isinstance(module, Gemma4TextExperts):
                hooks.append(module.register_forward_hook(_experts_hook(calib, f"{name}.{sub}", module.num_experts)))

    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    batches = prompts(tokenizer, samples)
    try:
        with torch.no_grad():
            for n, ids in enumerate(batches, 1):
                print(f"calibrating: sample {n}/{len(batches)} ({len(ids)} tokens)", flush=True)
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                calib.tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return calib


def _materialize(model: nn.Module, ckpt: Checkpoint, prefix: str, device) -> None:
    """Load everything but the decoder layers; non-persistent buffers (rotary tables, embed scale) are recomputed."""
    for name, child in model.named_children():
        if name == "layers":
            continue
        child.to_empty(device=device)
        for module in child.modules():
            model._init_weights(module)
        child.load_state_dict({k: ckpt.get(f"{prefix}{name}.{k}") for k in child.state_dict()})


def _loader(ckpt: Checkpoint, name: str, device):
    def load(module: nn.Module, args) -> None:
        state = {k: ckpt.get(f"{name}.{k}") for k in module.state_dict()}
        module.to_empty(device=device)
        module.load_state_dict(state)

    return load


def _unload(module: nn.Module, args, out) -> None:
    module.to("meta")


def _linear_hook(calib: Calibration, name: str):
    def hook(module: nn.Module, args) -> None:
        calib._max(name, args[0].abs().max())

    return hook


def _experts_hook(calib: Calibration, block: str, num_experts: int):
    layer = block.rsplit(".", 1)[0]
    counts = calib.expert_tokens.setdefault(layer, [0] * num_experts)

    def hook(module: nn.Module, args, out) -> None:
        x, top_k_index = args[0], args[1]
        calib.expert_input_amax[layer] = max(calib.expert_input_amax.get(layer, 0.0), float(x.abs().max()))
        kept = calib.expert_input_sample.get(layer, x[:0])
        calib.expert_input_sample[layer] = torch.cat([kept, x[: SAMPLE_ROWS - len(kept)]]).cpu()
        for e in top_k_index.unique().tolist():
            rows = x[(top_k_index == e).any(dim=-1)]
            gate, up = nn.functional.linear(rows, module.gate_up_proj[e]).chunk(2, dim=-1)
            counts[e] += len(rows)
            calib._max(f"{block}.{e}.gate_proj", rows.abs().max())
            calib._max(f"{block}.{e}.down_proj", (module.act_fn(gate) * up).abs().max())

    return hook


def expert_amax_fallback(
    calib: Calibration, layer: str, gate: torch.Tensor, up: torch.Tensor, act
) -> tuple[float, float]:
    """Input maxima for an expert no calibration token reached (gate/up input, down input).

    Every expert of a layer reads the same hidden states, so the gate/up input range is that tensor's
    maximum over all calibration tokens; the down input range is this expert's intermediate activation
    over the kept sample of those tokens, as if they had been routed to it.
    """
    x = calib.expert_input_sample[layer].float()
    mid = act(x @ gate.float().T) * (x @ up.float().T)
    return calib.expert_input_amax[layer], float(mid.abs().max())
