"""Build the GPT-2 tokenizer shipped in ``xlstm_hf/tokenizer/`` from a tiktoken rank file.

The input is GPT-2's byte-level BPE vocabulary in tiktoken format: one line per token,
``base64(token_bytes) rank``, ranks 0..50255. ``<|endoftext|>`` is not part of that file and is
added as special token id 50256.

The BPE merges are derived from the ranks (nothing is downloaded): for every multi-byte token, in
rank order, the rank-based byte-pair merge is run on the token's bytes, using only merges of rank
lower than the token itself, until two parts remain; those two parts form the merge that creates the
token. Token bytes are then mapped to GPT-2's printable byte-to-unicode alphabet (transformers'
``bytes_to_unicode``) and a
``tokenizers.Tokenizer`` (BPE model, ByteLevel pre-tokenizer with GPT-2's regex, ByteLevel decoder,
ByteLevel post-processor) is wrapped in transformers' ``GPT2Tokenizer`` and saved with
``save_pretrained``, so that ``AutoTokenizer.from_pretrained(out_dir)`` loads it offline.

The pad token is ``<|endoftext|>`` (GPT-2 has none of its own) and padding is on the left, the side
xLSTM generation treats exactly (padded positions are absent from every state).

Usage (from the repository root)::

    python conversion/build_gpt2_tokenizer.py [--ranks PATH] [--out DIR]

The output is deterministic: running the script twice produces identical files.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RANKS = REPO_ROOT.parent / "shared" / "data" / "gpt2" / "gpt2.tiktoken"
DEFAULT_OUT = REPO_ROOT / "xlstm_hf" / "tokenizer"

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# transformers' VERY_LARGE_INTEGER: "no maximum length" (the xLSTM is recurrent).
MODEL_MAX_LENGTH = int(1e30)


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file into ``{token_bytes: rank}`` and check that ranks are 0..n-1."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            token_b64, rank = line.split()
            token = base64.b64decode(token_b64)
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: duplicate token {token!r}")
            ranks[token] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Rank-based byte-pair merge of ``token`` using only merges with rank < ``max_rank``.

    Repeatedly merges the adjacent pair whose concatenation has the lowest rank (leftmost on ties,
    which cannot occur for distinct pairs of different ranks but keeps the procedure well defined),
    stopping when no allowed merge is left.
    """
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_idx, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best_idx, best_rank = i, r
        if best_idx is None:
            break
        parts[best_idx : best_idx + 2] = [parts[best_idx] + parts[best_idx + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Derive the ordered BPE merge list from the ranks (one merge per multi-byte token, in rank order)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = bpe_split(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) does not split into two earlier tokens: {parts!r}")
        left, right = parts
        if ranks[left] >= rank or ranks[right] >= rank:
            raise ValueError(f"merge parts of {token!r} (rank {rank}) have higher ranks: {parts!r}")
        merges.append((left, right))
    return merges


def build_backend_tokenizer(ranks: dict[bytes, int]):
    """Build the ``tokenizers.Tokenizer`` (byte-level BPE, GPT-2 pre-tokenization) from the ranks."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    single_bytes = [t for t in ranks if len(t) == 1]
    if len(single_bytes) != 256:
        raise ValueError(f"expected all 256 single bytes in the vocabulary, found {len(single_bytes)}")
    if len(ranks) != EOT_ID:
        raise ValueError(f"expected {EOT_ID} ranks (ids 0..{EOT_ID - 1}), found {len(ranks)}")

    byte_encoder = bytes_to_unicode()  # GPT-2's printable alphabet: byte value -> character

    def to_str(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in derive_merges(ranks)]

    # Same BPE/pre-tokenizer/decoder settings as transformers' GPT2Tokenizer builds, so that loading
    # and re-saving the tokenizer reproduces this tokenizer.json.
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    if tok.token_to_id(EOT_TOKEN) != EOT_ID:
        raise AssertionError(f"{EOT_TOKEN} got id {tok.token_to_id(EOT_TOKEN)}, expected {EOT_ID}")
    return tok


def build_hf_tokenizer(ranks: dict[bytes, int]):
    """Wrap the backend tokenizer in transformers' (fast, tokenizers-backed) ``GPT2Tokenizer``."""
    from transformers import GPT2Tokenizer

    # Note: do not pass add_bos_token/add_eos_token explicitly (both default to False): doing so makes
    # transformers replace the ByteLevel post-processor by a TemplateProcessing one.
    return GPT2Tokenizer(
        tokenizer_object=build_backend_tokenizer(ranks),
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        padding_side="left",
        add_prefix_space=False,
        model_max_length=MODEL_MAX_LENGTH,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=Path, default=DEFAULT_RANKS, help=f"tiktoken rank file (default: {DEFAULT_RANKS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    ranks = load_ranks(args.ranks)
    tokenizer = build_hf_tokenizer(ranks)

    # Sanity checks against known GPT-2 ids.
    checks = {"Hello world": [15496, 995], " the": [262], EOT_TOKEN: [EOT_ID]}
    for text, ids in checks.items():
        got = tokenizer.encode(text)
        if got != ids:
            raise AssertionError(f"{text!r} -> {got}, expected {ids}")
    if tokenizer.decode([EOT_ID - 1]) != " gazed":
        raise AssertionError(f"id {EOT_ID - 1} decodes to {tokenizer.decode([EOT_ID - 1])!r}, expected ' gazed'")

    args.out.mkdir(parents=True, exist_ok=True)
    files = tokenizer.save_pretrained(args.out)
    for f in files:
        print(f"wrote {f} ({Path(f).stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
