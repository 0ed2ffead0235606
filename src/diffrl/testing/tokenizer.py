"""A CLIP BPE tokenizer built from a generated vocabulary (no download)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP BPE uses for raw bytes (Radford et al. 2019)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def make_clip_tokenizer(directory: str | Path, *, model_max_length: int = 77) -> CLIPTokenizer:
    """Write a character-level CLIP vocabulary to ``directory`` and load it.

    Every byte has a token with and without the end-of-word marker, plus a
    handful of merges, so any text tokenizes (there is no unknown token in
    practice) while the vocabulary stays at a few hundred entries.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges = ["a t</w>", "c a", "ca t</w>", "d o", "do g</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer
