"""The tiny preset's tokenizers, generated here instead of downloaded: a character-level
CLIP BPE tokenizer (text encoder, CLIPSeg) and a small WordPiece vocabulary (Q-Former)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


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


def tiny_bert_tokenizer(folder: Path):
    """A small WordPiece vocabulary (letters, digits, common words) written to `folder`."""
    from transformers import BertTokenizer

    words = ("a an the of in on with and is dog cat toy ball vase box cup bottle lamp hat "
             "backpack teapot sneaker boot glasses candle clock can bowl plushie stuffed animal "
             "cartoon car robot red blue green yellow purple pink white black orange").split()
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *[f"##{c}" for c in letters], *words]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), truncation_side="right")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer
