"""Bad input, table-driven: each row is an input a user can get wrong and the error that must name it.

Python API rows must raise the given exception type with a message matching the pattern; command-line rows
(`xlstm-hf ...`) must exit with code 2 and print exactly one line on stderr matching the pattern, and
those marked `before_torch` must do so before the command module (and with it torch) is imported. The
behaviour behind each row is tested in depth elsewhere; this table makes sure none of them regresses into a
traceback, a silent wrong answer or a late error.
"""

import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import DataCollatorWithFlattening

import xlstm_hf_cli
from xlstm_hf import backends, xLSTMConfig


@dataclass
class Case:
    name: str
    call: Callable  # (tmp_path) -> None for API rows; (tmp_path) -> argv for CLI rows
    error: type | None  # None: a command-line row
    pattern: str
    before_torch: bool = False  # (CLI rows) refused before xlstm_hf.cli is imported


def _padded_mask(value):
    mask = torch.ones(2, 6)
    mask[0, :2] = value
    return mask


def _ids():
    return torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))


def _packed():
    batch = DataCollatorWithFlattening()([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def _packed_flash(cu=None):
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    batch = {k: torch.as_tensor(v) for k, v in batch.items()}
    if cu is not None:
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(cu, dtype=torch.int32)
    return batch


def _no_triton(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    backends.resolve_backend("triton", torch.device("cpu"))


def _saved_model(tmp_path, truncate=False, **overrides):
    folder = tmp_path / "model"
    tiny_model(**overrides).save_pretrained(folder)
    if truncate:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


API_CASES = [
    Case("mask of 0.5", lambda p: tiny_model()(_ids(), attention_mask=_padded_mask(0.5)), ValueError,
         r"attention_mask must hold 1 for real tokens and 0 for padding, got the value 0\.5"),
    Case("additive mask", lambda p: tiny_model()(_ids(), attention_mask=_padded_mask(float("-inf")) - 1),
         ValueError, r"attention_mask must hold 1 for real tokens and 0 for padding, got the value -inf \(an additive"),
    Case("mask of 2", lambda p: tiny_model()(_ids(), attention_mask=_padded_mask(2.0)), ValueError,
         r"got the value 2\.0"),
    Case("mask of the wrong shape", lambda p: tiny_model()(_ids(), attention_mask=torch.ones(2, 5)), ValueError,
         r"attention_mask must have shape \(2, 6\), got \(2, 5\)"),
    Case("cu_seq_lens short of the row", lambda p: tiny_model()(**_packed_flash(cu=[0, 3, 4])), ValueError,
         r"cu_seq_lens_q must rise from 0 to the row's length 5, got \[0, 3, 4\]"),
    Case("packing inputs that disagree", lambda p: tiny_model()(**_packed(), cu_seq_lens_q=torch.tensor([0, 2, 5])),
         ValueError, "cu_seq_lens and position_ids describe different packed documents"),
    Case("unknown keyword", lambda p: tiny_model()(_ids(), token_type_ids=torch.zeros(2, 6, dtype=torch.long)),
         TypeError, r"unexpected keyword arguments \['token_type_ids'\]"),
    Case("output_attentions", lambda p: tiny_model()(_ids(), output_attentions=True), ValueError,
         "no attention weights"),
    Case("id outside the vocabulary", lambda p: tiny_model()(torch.tensor([[3, 97]])), ValueError,
         r"input_ids contains id 97, outside the vocabulary \[0, 97\)"),
    Case("special id outside the vocabulary", lambda p: tiny_config(bos_token_id=50256), ValueError,
         r"bos_token_id must be None or a token id in \[0, vocab_size=97\), got 50256"),
    Case("eos list with a bad id", lambda p: tiny_config(eos_token_id=[1, 200]), ValueError,
         r"eos_token_id must be None or a token id"),
    Case("width override of 0", lambda p: xLSTMConfig(ffn_dim_override=0), ValueError, "ffn_dim_override"),
    Case("q/k width override in the paper design", lambda p: tiny_config(mlstm_qk_dim_override=16), ValueError,
         "mlstm_qk_dim_override applies to block_design='large' only"),
    Case("unknown tokenizer choice", lambda p: __import__("xlstm_hf.conversion.official", fromlist=["x"])
         .convert_official_checkpoint(p, p / "out", tokenizer="bert"), ValueError, "tokenizer must be one of"),
]

CLI_CASES = [
    Case("generate: no new tokens", lambda p: ["generate", "--model", str(p), "--max-new-tokens", "0"], None,
         "--max-new-tokens must be at least 1, got 0", before_torch=True),
    Case("generate: empty prompt", lambda p: ["generate", "--model", str(p), "--prompt", ""], None,
         "--prompt is empty", before_torch=True),
    Case("generate: temperature 0", lambda p: ["generate", "--model", str(p), "--temperature", "0"], None,
         "--temperature must be positive", before_torch=True),
    Case("generate: missing folder", lambda p: ["generate", "--model", str(p / "missing")], None,
         "no model folder at", before_torch=True),
    Case("generate: folder without config", lambda p: ["generate", "--model", str(p)], None,
         r"is not a model folder \(no config\.json\)", before_torch=True),
    Case("generate: truncated weights", lambda p: ["generate", "--model", str(_saved_model(p, truncate=True)),
                                                   "--max-new-tokens", "2"], None,
         r"cannot read the weights in .*model\.safetensors: the file is truncated or corrupt"),
    Case("demo: no time", lambda p: ["demo", "--minutes", "0"], None, "--minutes must be positive",
         before_torch=True),
    Case("train: missing file", lambda p: ["train", str(p / "missing.txt"), "--output-dir", str(p / "o")], None,
         "no such file or folder", before_torch=True),
    Case("train: bad overrides", lambda p: ["train", str(p), "--output-dir", str(p / "o"), "--config-overrides",
                                            "[1]"], None, "--config-overrides must be a JSON object"),
    Case("convert: missing folder", lambda p: ["convert", str(p / "missing"), str(p / "o")], None,
         "no checkpoint folder at", before_torch=True),
    Case("convert: weight mode without --to transformers", lambda p: ["convert", str(p), str(p / "o"),
                                                                      "--weight-mode", "fused"], None,
         "--weight-mode applies to --to transformers only", before_torch=True),
    Case("convert: tokenizer with --to transformers", lambda p: ["convert", str(p), str(p / "o"), "--to",
                                                                 "transformers", "--tokenizer", "gpt2"], None,
         "--tokenizer applies to conversions into xlstm_hf only", before_torch=True),
    Case("convert: our own paper-design folder", lambda p: ["convert", str(_saved_model(p)), str(p / "o")], None,
         r"is already an xlstm_hf checkpoint .*only the large \(xLSTM-7B\) design exports"),
    Case("convert: paper design to transformers", lambda p: ["convert", str(_saved_model(p)), str(p / "o"), "--to",
                                                             "transformers"], None, "only block_design='large'"),
    Case("convert: truncated official weights", lambda p: ["convert", str(_official_truncated(p)), str(p / "o")],
         None, r"model\.safetensors: not a readable safetensors file"),
]


def _official_truncated(tmp_path):
    """An official-format folder (config.yaml + model.safetensors) whose weights file is cut in half."""
    import yaml
    from safetensors.torch import save_file

    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"vocab_size": 97, "embedding_dim": 32, "num_blocks": 1,
                                                         "context_length": 16, "mlstm_block": {"mlstm": {"num_heads": 2}}}))
    save_file({"token_embedding.weight": torch.zeros(97, 32)}, str(folder / "model.safetensors"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.name)
def test_api_bad_input(case, tmp_path):
    with pytest.raises(case.error, match=case.pattern):
        case.call(tmp_path)


def test_missing_triton_is_an_import_error(tmp_path, monkeypatch):
    with pytest.raises(ImportError, match="needs the `triton` package"):
        _no_triton(tmp_path, monkeypatch)


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.name)
def test_cli_bad_input(case, tmp_path, capsys, monkeypatch):
    argv = case.call(tmp_path)
    capsys.readouterr()  # whatever building the fixture printed
    if case.before_torch:  # the command module must not be reached: make importing it fail loudly
        monkeypatch.setitem(sys.modules, "xlstm_hf.cli", None)
    with pytest.raises(SystemExit) as exit_info:
        xlstm_hf_cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"xlstm-hf {argv[0]}: error: "), err
    assert __import__("re").search(case.pattern, lines[0]), err
