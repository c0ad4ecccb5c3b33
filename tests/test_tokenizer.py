"""Tests for the GPT-2 tokenizer shipped in ``xlstm_hf/tokenizer/``.

The merges in the shipped ``tokenizer.json`` are derived from tiktoken ranks by
``conversion/build_gpt2_tokenizer.py``; these tests check them (and the pre-tokenization) against
tiktoken's own rank-based BPE as an independent oracle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # allow running the tests without installing the package
    sys.path.insert(0, str(REPO_ROOT))

from xlstm_hf.tokenization import GPT2_TOKENIZER_DIR, load_gpt2_tokenizer  # noqa: E402

EOT = "<|endoftext|>"
EOT_ID = 50256
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHAKESPEARE = REPO_ROOT / "xlstm_hf" / "data" / "shakespeare_valid.txt"

TRICKY = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "  Hello  world  ",
    "hello\n\nworld\n",
    "a\n\n\n\nb",
    "\n",
    "\n\n \n  \n",
    "trailing spaces     ",
    "     leading spaces",
    "\ttab\t\tseparated\t values\t",
    "mixed \t \n whitespace\r\n\r\nCRLF",
    "I'll've",
    "I'LL'VE you're we've they'd she's it'S don't",
    "''''quotes''' \"double\" `back`",
    "12345678901234567890 3.14159 1,000,000 0x1F -42 1e-10",
    "٣٤٥ ⅷ ² digits in other scripts",
    "café naïve coöperate résumé Ångström",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀👍🏽👨‍👩‍👧‍👦 🇩🇪 ❤️",
    "Zalgo: Z̸̧̛a̴͈͝l̷̰̈g̶̣͐o̵̰͒",
    "Ελληνικά, Русский, עברית, العربية, हिन्दी",
    "non\u00a0breaking\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth\ufeffBOM",
    "control \x00\x01\x07\x1b chars",
    "math: ∀x∈ℝ, ∑ᵢ xᵢ² ≤ ∞ → ✓",
    "URL https://example.com/path?q=1&r=two#frag and email a.b@c.de",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "<html><body class='x'>&amp; &lt;tag&gt;</body></html>",
    "End of doc.<|endoftext|>Start of next doc.",
    "<|endoftext|><|endoftext|> between <|endoftext|>",
    "<|endoftext|",
    "!!!???...---___***",
    "a" * 300,
    " " * 100 + "x",
]


@pytest.fixture(scope="module")
def tok():
    return load_gpt2_tokenizer()


def shipped_mergeable_ranks() -> dict[bytes, int]:
    """``{token_bytes: id}`` of the shipped base vocabulary, read back from tokenizer.json."""
    data = json.loads((GPT2_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    # Invert GPT-2's byte-to-unicode map (printable Latin-1 bytes map to themselves, the other
    # bytes to U+0100, U+0101, ... in byte order).
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    byte_decoder, n = {}, 0
    for b in range(256):
        if b in keep:
            byte_decoder[chr(b)] = b
        else:
            byte_decoder[chr(256 + n)] = b
            n += 1
    return {bytes(byte_decoder[c] for c in token): rank for token, rank in data["model"]["vocab"].items()}


@pytest.fixture(scope="module")
def tiktoken_oracle():
    tiktoken = pytest.importorskip("tiktoken")
    mergeable_ranks = shipped_mergeable_ranks()
    assert len(mergeable_ranks) == EOT_ID
    assert sorted(mergeable_ranks.values()) == list(range(EOT_ID))
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PAT,
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT: EOT_ID},
    )


# (a) known ids and round trips ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ids",
    [("Hello world", [15496, 995]), (" Hello world", [18435, 995]), (" the", [262]), (EOT, [EOT_ID])],
)
def test_known_ids(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok(text)["input_ids"] == ids


def test_known_decodes(tok):
    assert tok.decode([50255]) == " gazed"
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.decode([EOT_ID]) == EOT
    assert tok.decode([15496, EOT_ID, 995], skip_special_tokens=True) == "Hello world"
    assert tok.convert_ids_to_tokens([262, 50255]) == ["Ġthe", "Ġgazed"]


def test_no_special_tokens_added(tok):
    # No bos/eos is added around a sequence (add_bos_token / add_eos_token are False).
    assert tok.encode("Hello world", add_special_tokens=True) == [15496, 995]
    assert tok("a", "b")["input_ids"] == tok.encode("a") + tok.encode("b")


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_shakespeare(tok):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    assert tok.decode(tok.encode(text)) == text


# (b) independent oracle: tiktoken's rank-based BPE ----------------------------------------------


def test_oracle_known_ids(tiktoken_oracle):
    assert tiktoken_oracle.encode("Hello world") == [15496, 995]
    assert tiktoken_oracle.decode([50255]) == " gazed"


def test_matches_tiktoken_on_shakespeare(tok, tiktoken_oracle):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:100_000]
    assert len(text) > 50_000
    piece_len = 3_000
    pieces = [text[i : i + piece_len] for i in range(0, len(text), piece_len)]
    ours = tok(pieces)["input_ids"]
    theirs = [tiktoken_oracle.encode(p, allowed_special={EOT}) for p in pieces]
    for piece, a, b in zip(pieces, ours, theirs):
        assert a == b, piece[:200]


def test_matches_tiktoken_on_every_vocab_token(tok, tiktoken_oracle):
    """Encode the text of every (valid UTF-8) vocab token: exercises each merge near its own rank, so a
    merge derived with a wrong split makes its token come out differently from tiktoken's."""
    texts = []
    for token in shipped_mergeable_ranks():
        try:
            texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:  # partial UTF-8 sequences cannot be given as text
            pass
    assert len(texts) > 45_000
    ours = tok(texts)["input_ids"]
    theirs = [tiktoken_oracle.encode_ordinary(t) for t in texts]
    mismatches = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:10]


@pytest.mark.parametrize("text", TRICKY)
def test_matches_tiktoken_on_tricky_strings(tok, tiktoken_oracle, text):
    assert tok.encode(text) == tiktoken_oracle.encode(text, allowed_special={EOT})


def test_eot_inside_text(tok):
    ids = tok.encode("End of doc.<|endoftext|>Start")
    assert ids.count(EOT_ID) == 1
    assert tok.decode(ids) == "End of doc.<|endoftext|>Start"


# (c) loading the shipped files offline ----------------------------------------------------------


def test_loads_offline_with_autotokenizer(monkeypatch):
    from transformers import AutoTokenizer, GPT2Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (GPT2_TOKENIZER_DIR / "tokenizer.json").is_file()
    assert (GPT2_TOKENIZER_DIR / "tokenizer_config.json").is_file()
    t = AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR)
    assert isinstance(t, GPT2Tokenizer)
    assert t.is_fast
    assert t.eos_token == t.bos_token == t.unk_token == EOT
    assert t.eos_token_id == t.bos_token_id == EOT_ID
    assert t.pad_token == EOT and t.padding_side == "left"
    assert len(t) == 50257
    assert t.vocab_size == 50256  # base vocab; <|endoftext|> is an added special token
    assert t.model_max_length >= 10**20
    assert t.add_bos_token is False and t.add_eos_token is False
    cfg = json.loads((GPT2_TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "GPT2Tokenizer"


def test_loads_in_fresh_process_without_network(tmp_path):
    """Offline env vars set before anything is imported, and sockets disabled: loading must still work."""
    import os
    import subprocess

    code = (
        "import socket\n"
        "def _no_net(*a, **k):\n"
        "    raise OSError('network access attempted')\n"
        "socket.socket.connect = _no_net\n"
        "socket.create_connection = _no_net\n"
        f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from xlstm_hf.tokenization import load_gpt2_tokenizer\n"
        "t = load_gpt2_tokenizer()\n"
        "assert t.is_fast and t.eos_token_id == 50256 and len(t) == 50257\n"
        "print(t.encode('Hello world'))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[15496, 995]"


def test_pads_left_with_eos(tok):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR)
    batch = t(["Hello world", "Hi"], padding=True)
    assert batch["input_ids"][1] == [EOT_ID] + tok.encode("Hi")
    assert batch["attention_mask"][1] == [0, 1]


# (d) save / reload ------------------------------------------------------------------------------


def test_save_and_reload(tok, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is type(tok)
    assert len(reloaded) == len(tok)
    assert reloaded.eos_token_id == EOT_ID
    texts = TRICKY + [SHAKESPEARE.read_text(encoding="utf-8")[:5_000]]
    assert reloaded(texts)["input_ids"] == tok(texts)["input_ids"]
    # Re-saving the shipped tokenizer reproduces the shipped tokenizer.json byte for byte, and the
    # config up to loading bookkeeping that transformers 5 leaks into re-saved configs.
    assert (tmp_path / "tokenizer.json").read_bytes() == (GPT2_TOKENIZER_DIR / "tokenizer.json").read_bytes()
    leaked = {"is_local", "local_files_only"}
    saved_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    shipped_cfg = json.loads((GPT2_TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in saved_cfg.items() if k not in leaked} == shipped_cfg


# Shipped files vs. the rank file they were built from (skipped when the rank file is absent) -----

RANKS_FILE = REPO_ROOT.parent / "shared" / "data" / "gpt2" / "gpt2.tiktoken"
needs_ranks = pytest.mark.skipif(not RANKS_FILE.is_file(), reason=f"rank file {RANKS_FILE} not available")


@needs_ranks
def test_shipped_vocab_equals_rank_file():
    import base64

    ranks = {}
    for line in RANKS_FILE.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    assert shipped_mergeable_ranks() == ranks


def test_build_script_uses_transformers_byte_alphabet():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    sys.path.insert(0, str(REPO_ROOT / "conversion"))
    try:
        import build_gpt2_tokenizer
    finally:
        sys.path.remove(str(REPO_ROOT / "conversion"))
    assert build_gpt2_tokenizer.bytes_to_unicode is bytes_to_unicode  # the library's, not a copy
    # the alphabet of the shipped vocabulary: every single-byte token is that byte's character
    vocab = json.loads((GPT2_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert all(char in vocab for char in bytes_to_unicode().values())


@needs_ranks
def test_build_script_reproduces_shipped_files(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "conversion"))
    try:
        import build_gpt2_tokenizer
    finally:
        sys.path.remove(str(REPO_ROOT / "conversion"))
    build_gpt2_tokenizer.main(["--ranks", str(RANKS_FILE), "--out", str(tmp_path)])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (GPT2_TOKENIZER_DIR / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in GPT2_TOKENIZER_DIR.iterdir())
