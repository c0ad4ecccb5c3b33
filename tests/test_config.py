"""xLSTMConfig: special token ids that fit the vocabulary, explicit width overrides."""

from __future__ import annotations

import json
import re
from unittest import mock

import pytest
import torch
import transformers.configuration_utils
from huggingface_hub.errors import StrictDataclassError

from xlstm_hf import xLSTMConfig, xLSTMForCausalLM

TINY = dict(vocab_size=97, hidden_size=32, num_blocks=2, mlstm_num_heads=2, slstm_num_heads=2)
LARGE = dict(vocab_size=97, hidden_size=64, num_blocks=1, mlstm_num_heads=2, mlstm_round_up_to=1, ffn_round_up_to=16)
IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def ids_of(config) -> tuple:
    return tuple(getattr(config, name) for name in IDS)


# --------------------------------------------------------------------------------------------------
# Special token ids
# --------------------------------------------------------------------------------------------------


def test_small_vocabulary_gets_no_gpt2_ids_and_no_warning():
    """The GPT-2 default (50256) does not fit 97 tokens: it becomes None, and transformers' vocabulary check
    has nothing to warn about."""
    logger = transformers.configuration_utils.logger
    with mock.patch.object(logger, "warning_once") as warning_once, mock.patch.object(logger, "warning") as warning:
        config = xLSTMConfig(vocab_size=97)
    assert ids_of(config) == (None, None, None)
    assert not warning_once.called and not warning.called, (warning_once.call_args_list, warning.call_args_list)


@pytest.mark.parametrize("vocab_size, expected", [(50304, 50256), (50257, 50256), (50256, None)])
def test_gpt2_ids_where_the_vocabulary_holds_them(vocab_size, expected):
    assert ids_of(xLSTMConfig(vocab_size=vocab_size, hidden_size=32, num_blocks=1)) == (expected,) * 3


@pytest.mark.parametrize("field, value", [("bos_token_id", 50256), ("eos_token_id", 97), ("pad_token_id", -1),
                                          ("eos_token_id", [1, 200])])
def test_explicit_ids_outside_the_vocabulary_raise(field, value):
    expected = f"{field} must be None or a token id in [0, vocab_size=97), got {value}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        xLSTMConfig(**TINY, **{field: value})


def test_explicit_ids_are_kept_and_round_trip(tmp_path):
    config = xLSTMConfig(**TINY, bos_token_id=0, eos_token_id=[1, 96], pad_token_id=None)
    assert ids_of(config) == (0, [1, 96], None)
    config.save_pretrained(tmp_path / "a")
    assert ids_of(xLSTMConfig.from_pretrained(tmp_path / "a")) == (0, [1, 96], None)
    # an explicit None stays None where the default would have been 50256
    config = xLSTMConfig(hidden_size=32, num_blocks=1, bos_token_id=None)
    assert ids_of(config) == (None, 50256, 50256)
    config.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["bos_token_id"] is None
    assert ids_of(xLSTMConfig.from_pretrained(tmp_path / "b")) == (None, 50256, 50256)
    # a tiny config writes null, and reads back without a warning
    xLSTMConfig(**TINY).save_pretrained(tmp_path / "c")
    assert ids_of(xLSTMConfig.from_pretrained(tmp_path / "c")) == (None, None, None)


def test_presets_keep_their_ids():
    assert ids_of(xLSTMConfig.from_preset("xlstm-7b")) == (0, 2, 1)
    assert ids_of(xLSTMConfig.from_preset("xlstm-7b", **LARGE)) == (0, 2, 1)
    assert ids_of(xLSTMConfig.from_preset("xlstm-125m")) == (50256,) * 3
    with pytest.raises(ValueError, match="eos_token_id must be None or a token id in"):
        xLSTMConfig.from_preset("xlstm-7b", **{**LARGE, "vocab_size": 2})


def test_config_json_of_earlier_versions_loads(tmp_path, caplog):
    """Earlier versions saved the GPT-2 default 50256 whatever the vocabulary; such a config.json loads, with
    the out-of-vocabulary ids as None and one warning. Other stored ids load as they are."""
    xLSTMConfig(**TINY).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "bos_token_id": 50256, "eos_token_id": 50256,
                                                      "pad_token_id": 3}))
    with mock.patch("xlstm_hf.configuration_xlstm.logger.warning") as warning:
        config = xLSTMConfig.from_pretrained(tmp_path)
    assert ids_of(config) == (None, None, 3)
    (message,), _ = warning.call_args
    assert warning.call_count == 1 and "bos_token_id, eos_token_id = 50256 outside the vocabulary" in message


# --------------------------------------------------------------------------------------------------
# Width overrides
# --------------------------------------------------------------------------------------------------


def test_width_overrides_replace_the_rounding_rule(tmp_path):
    plain = xLSTMConfig.from_preset("xlstm-7b", **LARGE)
    assert (plain.mlstm_qk_dim, plain.mlstm_v_dim, plain.ffn_dim) == (32, 64, 176)  # ceil(64 * 2.667 / 16) * 16
    config = xLSTMConfig.from_preset("xlstm-7b", **LARGE, mlstm_qk_dim_override=30, mlstm_v_dim_override=62,
                                     ffn_dim_override=170)
    assert (config.mlstm_qk_dim, config.mlstm_v_dim, config.ffn_dim) == (30, 62, 170)
    config.save_pretrained(tmp_path)
    again = xLSTMConfig.from_pretrained(tmp_path)
    assert (again.mlstm_qk_dim, again.mlstm_v_dim, again.ffn_dim) == (30, 62, 170)
    with torch.device("meta"):
        model = xLSTMForCausalLM(again)
    block = model.backbone.blocks[0]
    assert tuple(block.mlstm.q_proj.weight.shape) == (30, 64) and tuple(block.mlstm.v_proj.weight.shape) == (62, 64)
    assert tuple(block.ffn.up_proj.weight.shape) == (340, 64) and tuple(block.ffn.down_proj.weight.shape) == (64, 170)
    # the paper design's sLSTM feed-forward too
    paper = xLSTMConfig(**TINY, slstm_at=[1], ffn_dim_override=40)
    with torch.device("meta"):
        assert tuple(xLSTMForCausalLM(paper).backbone.blocks[1].ffn.down_proj.weight.shape) == (32, 40)


@pytest.mark.parametrize("design, overrides, message", [
    ("large", {"ffn_dim_override": 0}, r"ffn_dim_override must be a positive integer or None"),
    ("large", {"mlstm_qk_dim_override": -4}, r"mlstm_qk_dim_override must be a positive integer or None"),
    ("large", {"mlstm_v_dim_override": 63}, r"mlstm_num_heads \(2\) must divide the mLSTM v width 63"),
    ("large", {"mlstm_qk_dim_override": 31}, r"mlstm_num_heads \(2\) must divide the mLSTM q/k width 31"),
    ("paper", {"mlstm_qk_dim_override": 32}, r"mlstm_qk_dim_override applies to block_design='large' only"),
    ("paper", {"mlstm_v_dim_override": 32}, r"mlstm_v_dim_override applies to block_design='large' only"),
])
def test_bad_width_overrides(design, overrides, message):
    with pytest.raises(ValueError, match=message):
        if design == "large":
            xLSTMConfig.from_preset("xlstm-7b", **LARGE, **overrides)
        else:
            xLSTMConfig(**TINY, **overrides)
    with pytest.raises(StrictDataclassError):
        xLSTMConfig(**TINY, ffn_dim_override=12.5)
