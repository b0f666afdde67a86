"""Pieces of the `tiny` preset that are built locally instead of downloaded.

The tiny preset runs every stage offline on a CPU: networks come from small configs with
seeded random weights, and tokenizers are generated here.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE maps bytes to."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges of a character-level CLIP BPE tokenizer.

    Every byte is a token, with and without CLIP's end-of-word marker, and there are no
    merges: words become character sequences. Small (514 tokens) and deterministic, yet
    the real tokenizer class reads it, so the code paths match the full-size models.
    """
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, []


def clip_tokenizer(model_max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_files()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
