"""A real CLIP tokenizer, built offline.

Stable Diffusion's tokenizer is CLIP's 49408-token byte-level BPE. Its merges ship inside
open_clip (``bpe_simple_vocab_16e6.txt.gz``), so the same tokenizer can be rebuilt on a
machine with no model hub: the vocabulary is the 256 byte symbols, the same with the
end-of-word marker ``</w>``, one entry per merge, then the two special tokens. Token ids
match open_clip's and the hub's ``openai/clip-vit-*`` tokenizers.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _default_bpe_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "Building the CLIP tokenizer offline needs the merges file that open_clip_torch ships: "
            "pip install open_clip_torch"
        )
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=4)
def _vocab_and_merges(bpe_path: str) -> tuple[dict[str, int], tuple[str, ...]]:
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = tuple(lines)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer(model_max_length: int = 77, bpe_path: str | None = None):
    """A ``transformers.CLIPTokenizer`` identical to Stable Diffusion's, built with no network.

    Args:
        model_max_length: padded/truncated sequence length (77 for SD).
        bpe_path: the gzipped merges file; defaults to the one open_clip ships.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges(bpe_path or _default_bpe_path())
    # transformers 5.x: CLIPTokenizer takes vocab=/merges= (vocab_file= silently gives 2 tokens).
    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    if len(tok) != 49408:
        raise RuntimeError(f"offline CLIP tokenizer has {len(tok)} tokens, expected 49408")
    return tok
