"""Full-size Gemma 4 26B-A4B folders with dummy weights, for `python -m bench --dummy`.

bench.checkpoints writes the config next to the tiny test tokenizer (1,024 tokens). Random weights then
generate ids anywhere in the real 262,144-token vocabulary, which that tokenizer decodes to nothing: the
Engine and the app would stream empty text, and their per-token text work (detokenizing, splitting
reasoning, re-rendering the chat, Gradio's diffs) would cost nothing. `widen_tokenizer` gives every id a
short word of its own (" baqd"), roughly the ~4 characters a real Gemma token carries, without changing
how any text is encoded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import string
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_BUILDER = ROOT / "tests" / "tiny_model.py"
LETTERS = string.ascii_lowercase
BYTE_LEVEL_SPACE = "\u0120"  # "Ġ": the byte-level BPE alphabet's stand-in for a space


def tiny_vision_dir(explicit: Path | None = None) -> Path:
    """The tiny vision checkpoint lending the tokenizer and processor: the tests' cache, built if missing."""
    if explicit is not None:
        return explicit
    if not TINY_BUILDER.is_file():
        raise FileNotFoundError(f"{TINY_BUILDER} is missing: pass --tokenizer-from DIR (a tiny Gemma 4 checkpoint)")
    digest = hashlib.sha256(TINY_BUILDER.read_bytes()).hexdigest()[:16]
    final = ROOT / ".tiny" / digest / "vision"  # the same place tests/conftest.py caches it
    if final.is_dir():
        return final
    from tests.tiny_model import build_tiny_gemma4

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vision-", dir=final.parent))
    build_tiny_gemma4(tmp, vision=True)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp)
    return final


def synthetic_token(i: int, width: int = 4) -> str:
    """A distinct lower-case word for id i, written in the byte-level alphabet with a leading space."""
    letters = []
    for _ in range(width):
        i, r = divmod(i, len(LETTERS))
        letters.append(LETTERS[r])
    if i:
        letters.append(LETTERS[i % len(LETTERS)] * (i // len(LETTERS) + 1))
    return BYTE_LEVEL_SPACE + "".join(reversed(letters))


def widen_tokenizer(folder: Path, vocab_size: int) -> int:
    """Extend tokenizer.json's BPE vocabulary to `vocab_size` ids; returns how many were added.

    New entries are reachable by no merge, so encoding any text gives the same ids as before; only
    decoding the new ids changes (from nothing to a word each).
    """
    path = Path(folder) / "tokenizer.json"
    data = json.loads(path.read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: expected a BPE tokenizer, found {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    used_ids = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    used_strings = set(vocab) | {t["content"] for t in data.get("added_tokens", [])}
    added = 0
    for i in range(vocab_size):
        if i in used_ids:
            continue
        token = synthetic_token(i)
        while token in used_strings:
            token += "q"
        vocab[token] = i
        used_strings.add(token)
        added += 1
    path.write_text(json.dumps(data, ensure_ascii=False))
    return added


def prepare(out: Path, *, nvfp4: bool, tokenizer_from: Path | None = None, widen: bool = True) -> Path:
    """The full-size folder for one dtype under `out` (rewritten each time: it is only configs)."""
    from bench.checkpoints import write_full_size_checkpoint

    folder = Path(out) / ("gemma4-26b-a4b-nvfp4-dummy" if nvfp4 else "gemma4-26b-a4b-bf16-dummy")
    if folder.exists():
        shutil.rmtree(folder)
    write_full_size_checkpoint(folder, tokenizer_from=tiny_vision_dir(tokenizer_from), nvfp4=nvfp4)
    if widen:
        config = json.loads((folder / "config.json").read_text())
        widen_tokenizer(folder, int((config.get("text_config") or config)["vocab_size"]))
    return folder
