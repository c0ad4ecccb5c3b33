"""The GPT-2 tokenizer shipped with the package (built by ``conversion/build_gpt2_tokenizer.py``).

It is the standard GPT-2 byte-level BPE tokenizer (50,257 tokens; ``<|endoftext|>`` = 50256 is the
bos/eos/unk token, and also the pad token, with padding on the left: the side xLSTM generation
treats exactly). Loading needs no network access.
"""

from __future__ import annotations

from pathlib import Path

#: Folder holding the shipped ``tokenizer.json`` and ``tokenizer_config.json``.
GPT2_TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"


def load_gpt2_tokenizer(**kwargs):
    """Load the shipped GPT-2 tokenizer; ``kwargs`` are passed to ``AutoTokenizer.from_pretrained``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR, **kwargs)
