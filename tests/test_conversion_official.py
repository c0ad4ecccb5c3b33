"""Conversion of official `xlstm` (2.0.6) checkpoints: the converted model must compute what the official
`xLSTMLMModel` computes.

The official models are built on CPU with the vanilla sLSTM backend and then have EVERY parameter
randomised: the official init leaves the sLSTM recurrent kernels and the mLSTM gate weights at zero and
every norm at scale 1, which would hide a wrong transpose, a swapped gate or a missing `1 + w`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from xlstm.blocks.mlstm.block import mLSTMBlockConfig
from xlstm.blocks.mlstm.layer import mLSTMLayerConfig
from xlstm.blocks.slstm.block import sLSTMBlockConfig
from xlstm.blocks.slstm.cell import sLSTMCell_cuda
from xlstm.blocks.slstm.layer import sLSTMLayerConfig
from xlstm.components.feedforward import FeedForwardConfig
from conftest import run_cli
from xlstm.xlstm_lm_model import xLSTMLMModel, xLSTMLMModelConfig

import xlstm_hf  # registers our model with the Auto classes
from xlstm_hf.conversion import official as official_module
from xlstm_hf.conversion.official import (
    config_from_official,
    convert_official_checkpoint,
    convert_state_dict,
    load_official_config,
    load_official_state_dict,
)

CONTEXT = 96  # official context_length; our default chunk_size is 64, so length 96 spans two chunks
LENGTHS = (20, 96)
TOLERANCE = 1e-4  # max |ours - official| / max |official| on fp32 logits

# --------------------------------------------------------------------------------------------------
# Official configs as a user writes them in config.yaml (only user-facing fields)
# --------------------------------------------------------------------------------------------------

MLSTM_ONLY = {
    "vocab_size": 97, "embedding_dim": 32, "num_blocks": 2, "context_length": CONTEXT,
    "mlstm_block": {"mlstm": {"num_heads": 4, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4}},
}
SLSTM_ONLY = {
    "vocab_size": 97, "embedding_dim": 32, "num_blocks": 2, "context_length": CONTEXT, "tie_weights": True,
    "slstm_block": {
        "slstm": {"backend": "vanilla", "num_heads": 2, "conv1d_kernel_size": 4},
        "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"},
    },
}
MIXED_S1 = {
    "vocab_size": 97, "embedding_dim": 32, "num_blocks": 4, "context_length": CONTEXT, "slstm_at": [1],
    "bias": True, "tie_weights": True,
    "mlstm_block": {"mlstm": {"num_heads": 2, "conv1d_kernel_size": 2, "qkv_proj_blocksize": 8}},
    "slstm_block": {
        "slstm": {"backend": "vanilla", "num_heads": 4, "conv1d_kernel_size": 0, "bias_init": "small_init"},
        "feedforward": {"act_fn": "swish"},  # the official FFN bias does not follow the top-level bias
    },
}
MIXED_S02 = {
    "vocab_size": 64, "embedding_dim": 32, "num_blocks": 4, "context_length": CONTEXT, "slstm_at": [0, 2],
    "add_post_blocks_norm": False,
    "mlstm_block": {"mlstm": {"num_heads": 1, "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4,
                              "proj_factor": 1.5, "round_proj_up_to_multiple_of": 16}},
    "slstm_block": {
        "slstm": {"backend": "vanilla", "num_heads": 1, "conv1d_kernel_size": 4},
        "feedforward": {"proj_factor": 2, "act_fn": "gelu", "round_proj_up_to_multiple_of": 16, "bias": True},
    },
}
ALL_SLSTM = {  # slstm_at "all" although an mLSTM block config is given
    "vocab_size": 61, "embedding_dim": 16, "num_blocks": 2, "context_length": CONTEXT, "slstm_at": "all",
    "mlstm_block": {"mlstm": {"num_heads": 2}},
    "slstm_block": {"slstm": {"backend": "vanilla", "num_heads": 2, "conv1d_kernel_size": 2}},
}


def official_config(spec: dict) -> xLSTMLMModelConfig:
    """The official config object for a config.yaml mapping, with the sLSTM on the vanilla (CPU) backend."""
    spec = copy.deepcopy(spec)
    mlstm, slstm = spec.pop("mlstm_block", None), spec.pop("slstm_block", None)
    mlstm_block = mLSTMBlockConfig(mlstm=mLSTMLayerConfig(**mlstm.get("mlstm", {}))) if mlstm is not None else None
    slstm_block = None
    if slstm is not None:
        layer = {**slstm.get("slstm", {}), "backend": "vanilla"}
        slstm_block = sLSTMBlockConfig(slstm=sLSTMLayerConfig(**layer),
                                       feedforward=FeedForwardConfig(**slstm.get("feedforward", {})))
    return xLSTMLMModelConfig(mlstm_block=mlstm_block, slstm_block=slstm_block, **spec)


def randomise_(model: xLSTMLMModel, seed: int) -> None:
    """Overwrite every parameter with noise that keeps the model in a sensible regime.

    Matrices ~ normal(0, 0.2); norm weights (official: scale 1 + w) ~ normal(0, 0.2); the mLSTM forget-gate
    bias in [1, 4] (mostly remembering) and the input-gate bias ~ normal(0, 0.5) with small gate weights;
    sLSTM recurrent kernels clearly non-zero; sLSTM biases = their init + noise.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlstm_cell.fgate.bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 3 + 1)
            elif name.endswith("mlstm_cell.igate.bias"):
                p.copy_(normal(p.shape, 0.5))
            elif "mlstm_cell" in name and name.endswith("gate.weight"):
                p.copy_(normal(p.shape, 0.05))
            elif name.endswith("slstm_cell._recurrent_kernel_"):
                p.copy_(normal(p.shape, 0.3))
            elif name.endswith("slstm_cell._bias_"):
                p.add_(normal(p.shape, 0.3))
            elif "norm" in name:
                p.copy_(normal(p.shape, 0.2))
            elif name.endswith("learnable_skip"):
                p.copy_(1 + normal(p.shape, 0.2))
            elif name == "token_embedding.weight":
                p.copy_(normal(p.shape, 1.0))
            elif name.endswith("bias"):
                p.copy_(normal(p.shape, 0.1))
            else:
                p.copy_(normal(p.shape, 0.2))


def build_official(spec: dict, seed: int = 0) -> xLSTMLMModel:
    torch.manual_seed(seed)
    model = xLSTMLMModel(official_config(spec))
    randomise_(model, seed)
    assert all(p.abs().sum() > 0 for p in model.parameters())
    return model.eval()


def official_state_dict(model: xLSTMLMModel, slstm_layout: str = "vanilla", keep_tied_head: bool = True) -> dict:
    """The official state dict as a checkpoint would hold it, with the sLSTM cells in `slstm_layout`.

    For "cuda" the internal layout is made from the official external parameters with the official
    `sLSTMCell_cuda` conversion (its CUDA backend is not initialised, so this runs on CPU).
    """
    sd = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_weights and not keep_tied_head:
        del sd["lm_head.weight"]
    if slstm_layout == "cuda":
        for j, block in enumerate(model.xlstm_block_stack.blocks):
            cell = getattr(block.xlstm, "slstm_cell", None)
            if cell is None:
                continue
            cuda_cell = sLSTMCell_cuda(copy.deepcopy(cell.config), skip_backend_init=True)
            prefix = f"xlstm_block_stack.blocks.{j}.xlstm.slstm_cell."
            with torch.no_grad():
                kernel = cell._recurrent_kernel_int2ext(cell._recurrent_kernel_)
                bias = cell._bias_int2ext(cell._bias_)
                sd[prefix + "_recurrent_kernel_"] = cuda_cell._recurrent_kernel_ext2int(kernel).contiguous().clone()
                sd[prefix + "_bias_"] = cuda_cell._bias_ext2int(bias).contiguous().clone()
    return sd


def write_checkpoint(path, spec: dict, sd: dict, *, nested: bool = False, weights: str = "safetensors",
                     backend: str | None = "vanilla"):
    """An official checkpoint folder: config.yaml (bare, or under `model:` of an experiment YAML) + weights.

    `backend` is what config.yaml says for the sLSTM ("vanilla", "cuda", or None = key absent).
    """
    path.mkdir(parents=True, exist_ok=True)
    spec = copy.deepcopy(spec)
    if spec.get("slstm_block") is not None:
        spec["slstm_block"].setdefault("slstm", {}).pop("backend", None)
        if backend is not None:
            spec["slstm_block"]["slstm"]["backend"] = backend
    if nested:  # as the official experiment files: interpolations, a run name, other sections
        vocab = spec.pop("vocab_size")
        spec.update(name="xlstm_test", vocab_size="${dataset.kwargs.vocab_size}",
                    context_length="${dataset.kwargs.context_length}")
        doc = {"training": {"lr": 1e-3, "num_steps": 10, "lr_decay_until_steps": "${.num_steps}"}, "model": spec,
               "dataset": {"name": "synthetic", "kwargs": {"vocab_size": vocab, "context_length": CONTEXT}}}
    else:
        doc = spec
    (path / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    if weights == "safetensors":
        save_file(sd, str(path / "model.safetensors"))
    else:  # a training checkpoint: wrapped, with DistributedDataParallel's prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "step": 10}, path / f"ckpt.{weights}")
    return path


def load_converted(out) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def assert_same_logits(ours, official, vocab: int, seed: int = 0) -> list[float]:
    """Compare logits on random ids for every length in LENGTHS; returns the errors."""
    g = torch.Generator().manual_seed(seed)
    errors = []
    for T in LENGTHS:
        ids = torch.randint(0, vocab, (2, T), generator=g)
        with torch.no_grad():
            ref = official(ids)
            got = ours(ids).logits
        assert got.shape == ref.shape
        errors.append(max_rel_err(got, ref))
        assert errors[-1] <= TOLERANCE, f"length {T}: max rel err {errors[-1]:.2e}"
    return errors


# --------------------------------------------------------------------------------------------------
# Logit parity
# --------------------------------------------------------------------------------------------------

PARITY_CASES = {
    # id: (spec, config.yaml nested under model:, weights file, keep the tied head in the checkpoint)
    "mlstm_only": (MLSTM_ONLY, False, "safetensors", True),
    "slstm_only_tied": (SLSTM_ONLY, True, "safetensors", False),
    "mixed_s1_bias_swish_tied": (MIXED_S1, False, "safetensors", True),
    "mixed_s02_untied_pt": (MIXED_S02, True, "pt", True),
    "all_slstm": (ALL_SLSTM, False, "bin", True),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_official(case, tmp_path):
    spec, nested, weights, keep_head = PARITY_CASES[case]
    official = build_official(spec, seed=1)
    sd = official_state_dict(official, keep_tied_head=keep_head)
    src = write_checkpoint(tmp_path / "official", spec, sd, nested=nested, weights=weights)
    out = convert_official_checkpoint(src, tmp_path / "hf")
    ours = load_converted(out)
    assert ours.config.tie_word_embeddings == bool(spec.get("tie_weights", False))
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.backbone.embeddings.weight
    assert ours.config.block_types == ["s" if b else "m" for b in official.config.block_map]
    errors = assert_same_logits(ours, official, spec["vocab_size"])
    print(f"{case}: max rel err per length {dict(zip(LENGTHS, (f'{e:.1e}' for e in errors)))}")


@pytest.mark.parametrize("backend", ["cuda", None], ids=["backend_cuda", "backend_absent"])
def test_cuda_layout(backend, tmp_path):
    """A checkpoint saved with the CUDA sLSTM backend (also the official default when `backend` is absent)."""
    spec = {**MIXED_S02, "num_blocks": 3, "slstm_at": [0, 2], "tie_weights": True,
            "slstm_block": {"slstm": {"num_heads": 2, "conv1d_kernel_size": 4}, "feedforward": {"act_fn": "gelu"}}}
    official = build_official(spec, seed=2)
    sd = official_state_dict(official, slstm_layout="cuda", keep_tied_head=False)
    assert sd["xlstm_block_stack.blocks.0.xlstm.slstm_cell._recurrent_kernel_"].shape == (2, 16, 64)
    src = write_checkpoint(tmp_path / "official", spec, sd, backend=backend)
    assert config_from_official(load_official_config(src))[1] == "cuda"
    ours = load_converted(convert_official_checkpoint(src, tmp_path / "hf"))
    errors = assert_same_logits(ours, official, spec["vocab_size"])
    print(f"cuda layout ({backend}): max rel err per length {dict(zip(LENGTHS, (f'{e:.1e}' for e in errors)))}")


def test_wrong_layout_is_caught(tmp_path):
    """A vanilla-layout kernel under `backend: cuda` has the other shape; the error names it."""
    official = build_official(MIXED_S1)
    config, _ = config_from_official(MIXED_S1)
    with pytest.raises(ValueError, match=r"blocks\.1\.xlstm\.slstm_cell\._recurrent_kernel_.*\(4, 32, 8\).*\(4, 8, 32\)"):
        convert_state_dict(official_state_dict(official), config, "cuda")


# --------------------------------------------------------------------------------------------------
# Greedy decoding
# --------------------------------------------------------------------------------------------------


def official_greedy_step(official, prompt, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the official recurrent `step()`, one token at a time, prompt included."""
    state, logits = None, None
    with torch.no_grad():
        for t in range(prompt.shape[1]):
            logits, state = official.step(prompt[:, t:t + 1], state)
        out = []
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            logits, state = official.step(token, state)
    return torch.cat([prompt, *out], dim=1)


def official_greedy_forward(official, prompt, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the official parallel `forward` over the whole sequence at every step."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, official(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("case", ["mlstm_only", "mixed_s1_bias_swish_tied", "mixed_s02_untied_pt"])
def test_greedy_generation_matches_official(case, tmp_path):
    spec = PARITY_CASES[case][0]
    official = build_official(spec, seed=3)
    src = write_checkpoint(tmp_path / "official", spec, official_state_dict(official), weights="safetensors")
    ours = load_converted(convert_official_checkpoint(src, tmp_path / "hf"))
    prompt = torch.randint(0, spec["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ours.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(got, official_greedy_forward(official, prompt, 12))
    assert torch.equal(got, official_greedy_step(official, prompt, 12))


# --------------------------------------------------------------------------------------------------
# Config mapping
# --------------------------------------------------------------------------------------------------


def test_config_mapping():
    config, layout = config_from_official(MIXED_S02)
    assert layout == "vanilla"
    assert (config.vocab_size, config.hidden_size, config.num_blocks, config.slstm_at) == (64, 32, 4, [0, 2])
    assert (config.mlstm_num_heads, config.mlstm_conv_kernel_size, config.mlstm_qkv_proj_blocksize) == (1, 4, 4)
    assert (config.mlstm_proj_factor, config.mlstm_round_up_to, config.mlstm_inner_dim) == (1.5, 16, 48)
    assert (config.slstm_num_heads, config.slstm_conv_kernel_size) == (1, 4)
    assert (config.ffn_proj_factor, config.ffn_round_up_to, config.ffn_dim, config.ffn_act_fn) == (2.0, 16, 64, "gelu")
    assert not config.add_post_blocks_norm and not config.use_bias and not config.tie_word_embeddings
    assert config.bos_token_id is config.eos_token_id is config.pad_token_id is None
    # official defaults where ours differ (num_blocks 1, embedding_dim 128, slstm_at [])
    config, layout = config_from_official({"vocab_size": 50304, "mlstm_block": {}})
    assert (config.num_blocks, config.hidden_size, config.slstm_at, layout) == (1, 128, [], "cuda")
    # the official config names no tokenizer: a GPT-2-sized vocabulary gets GPT-2's ids only when told so
    assert config.eos_token_id is config.bos_token_id is config.pad_token_id is None
    config, _ = config_from_official({"vocab_size": 50304, "mlstm_block": {}}, token_ids=(50256, 50256, 50256))
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == 50256
    # no mLSTM block config: every block is an sLSTM block
    assert config_from_official({**SLSTM_ONLY, "slstm_at": [0]})[0].slstm_at == [0, 1]


def test_config_with_official_internals():
    """A full dump of an official config (every derived and internal field) converts like the user YAML."""
    for spec in (MIXED_S1, MIXED_S02, SLSTM_ONLY):
        dump = dataclasses.asdict(official_config(spec))
        assert config_from_official(dump)[0].to_dict() == config_from_official(spec)[0].to_dict()


def test_experiment_yaml(tmp_path):
    src = write_checkpoint(tmp_path, MIXED_S1, {"x": torch.zeros(1)}, nested=True)
    d = load_official_config(src)
    assert d["vocab_size"] == 97 and d["context_length"] == CONTEXT and "name" not in d
    (tmp_path / "config.yaml").write_text("model:\n  vocab_size: ${dataset.vocab_size}\n  mlstm_block: {}\n")
    with pytest.raises(ValueError, match=r"model\.vocab_size.*dataset\.vocab_size"):
        load_official_config(tmp_path)


BAD_CONFIGS = [
    ({"foo": 1}, r"^foo: unknown"),
    ({"mlstm_block": {"mlstm": {"num_heads": 2, "foo": 1}}}, r"mlstm_block\.mlstm\.foo: unknown"),
    ({"mlstm_block": {"extra": {}}}, r"mlstm_block\.extra: unknown"),
    ({"slstm_block": {"slstm": {"bar": 1}}}, r"slstm_block\.slstm\.bar: unknown"),
    ({"slstm_block": {"feedforward": {"baz": 1}}}, r"slstm_block\.feedforward\.baz: unknown"),
    ({"slstm_block": {"slstm": {"function": "lstm"}}}, r"slstm_block\.slstm\.function: 'lstm'"),
    ({"slstm_block": {"slstm": {"forward_clipval": 2.0}}}, r"forward_clipval: 2\.0"),
    ({"slstm_block": {"slstm": {"group_norm_weight": False}}}, r"group_norm_weight: False"),
    ({"slstm_block": {"slstm": {"backend": "triton"}}}, r"backend: 'triton'"),
    ({"slstm_block": {"slstm": {"backend": "cuda", "gradient_recurrent_clipval": 0.5}}},
     r"gradient_recurrent_clipval: 0\.5"),
    ({"slstm_block": {"feedforward": {"ff_type": "ffn"}}}, r"feedforward\.ff_type: 'ffn'"),
    ({"slstm_block": {"feedforward": {"round_proj_up_dim_up": False}}}, r"feedforward\.round_proj_up_dim_up"),
    ({"mlstm_block": {"mlstm": {"round_proj_up_dim_up": False}}}, r"mlstm_block\.mlstm\.round_proj_up_dim_up"),
    ({"slstm_block": {"slstm": {}, "feedforward": None}}, r"slstm_block\.feedforward: null"),
    ({"slstm_at": "7:1"}, r"slstm_at: expected"),
    ({"mlstm_block": {}, "slstm_block": None, "slstm_at": [0]}, r"slstm_at: \[0\].*slstm_block is null"),
    ({"mlstm_block": None, "slstm_block": None}, r"mlstm_block, slstm_block"),
    ({"slstm_at": [5]}, r"slstm_at"),
    ({"slstm_block": {"feedforward": {"act_fn": "tanh"}}}, r"ffn_act_fn.*slstm_block\.feedforward\.act_fn"),
    ({"embedding_dim": "wide"}, r"hidden_size.*is official embedding_dim"),
]


@pytest.mark.parametrize("change, message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config(change, message):
    base = {"vocab_size": 97, "embedding_dim": 32, "num_blocks": 2, "slstm_at": [1],
            "mlstm_block": {"mlstm": {"num_heads": 2}}, "slstm_block": {"slstm": {"num_heads": 2}}}
    d = {**base, **change}
    with pytest.raises(ValueError, match=message):
        config_from_official(d)


def test_gradient_clipval_accepted_where_it_does_not_act():
    config_from_official({"vocab_size": 97, "slstm_block": {"slstm": {"backend": "vanilla",
                                                                      "gradient_recurrent_clipval": 0.5}}})
    config_from_official({"vocab_size": 97, "slstm_block": {"slstm": {"gradient_recurrent_clipval": 1.0}}})


# --------------------------------------------------------------------------------------------------
# State dict errors
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_sd():
    official = build_official(MIXED_S1)
    return official_state_dict(official), config_from_official(MIXED_S1)[0]


def test_unknown_key(mixed_sd):
    sd, config = mixed_sd
    for key in ("xlstm_block_stack.blocks.0.xlstm.foo.weight",
                "xlstm_block_stack.blocks.0.xlstm.slstm_cell._bias_",  # an sLSTM key in an mLSTM block
                "xlstm_block_stack.blocks.7.xlstm_norm.weight",  # no such block
                "xlstm_block_stack.post_blocks_norm.bias"):
        with pytest.raises(ValueError, match=rf"^{re.escape(key)}: unknown"):
            convert_state_dict({**sd, key: torch.zeros(3)}, config, "vanilla")


def test_missing_key(mixed_sd):
    sd, config = mixed_sd
    sd = {k: v for k, v in sd.items() if k != "xlstm_block_stack.blocks.0.xlstm.proj_up.bias"}
    with pytest.raises(ValueError, match=r"backbone\.blocks\.0\.mlstm\.up_proj\.bias: missing"):
        convert_state_dict(sd, config, "vanilla")


def test_shape_mismatch(mixed_sd):
    sd, config = mixed_sd
    key = "xlstm_block_stack.blocks.2.xlstm.proj_up.weight"
    with pytest.raises(ValueError, match=rf"{re.escape(key)}.*\(128, 31\).*\(128, 32\)"):
        convert_state_dict({**sd, key: sd[key][:, :31]}, config, "vanilla")
    key = "xlstm_block_stack.blocks.1.xlstm.slstm_cell._bias_"
    with pytest.raises(ValueError, match=rf"{re.escape(key)}.*\(127,\).*\(128,\)"):
        convert_state_dict({**sd, key: sd[key][:127]}, config, "vanilla")


def test_tied_head_must_equal_embedding(mixed_sd):
    sd, config = mixed_sd
    with pytest.raises(ValueError, match=r"lm_head\.weight: differs"):
        convert_state_dict({**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, config, "vanilla")


def test_converted_state_dict(mixed_sd):
    """Names match our model exactly; the renames and the `1 + w` norms are where they should be."""
    sd, config = mixed_sd
    ours = convert_state_dict(sd, config, "vanilla")
    assert all(t.is_contiguous() for t in ours.values())
    assert "lm_head.weight" not in ours  # tied
    model = xlstm_hf.xLSTMForCausalLM(config)
    assert set(ours) | {"lm_head.weight"} == set(model.state_dict())
    official_block, our_block = "xlstm_block_stack.blocks.1.", "backbone.blocks.1."
    assert torch.equal(ours[our_block + "slstm.igate.weight"], sd[official_block + "xlstm.fgate.weight"])
    assert torch.equal(ours[our_block + "slstm.fgate.weight"], sd[official_block + "xlstm.igate.weight"])
    assert torch.equal(ours[our_block + "ffn_norm.weight"], sd[official_block + "ffn_norm.weight"] + 1)
    assert torch.equal(ours["backbone.final_norm.weight"], sd["xlstm_block_stack.post_blocks_norm.weight"] + 1)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def test_weight_file_discovery(tmp_path):
    with pytest.raises(ValueError, match=r"found \[\]"):
        load_official_state_dict(tmp_path)
    torch.save({"model": {"_orig_mod.a": torch.ones(2)}}, tmp_path / "a.pth")
    assert list(load_official_state_dict(tmp_path)) == ["a"]
    # nested wrappers (torch.compile of a DistributedDataParallel model and the reverse), and unwrapped keys
    torch.save({"state_dict": {"_orig_mod.module.a": torch.ones(2), "module._orig_mod.b": torch.ones(1),
                               "c": torch.zeros(1)}}, tmp_path / "a.pth")
    assert sorted(load_official_state_dict(tmp_path)) == ["a", "b", "c"]
    torch.save({"a": torch.ones(2)}, tmp_path / "b.bin")
    with pytest.raises(ValueError, match=r"found \['a\.pth', 'b\.bin'\]"):
        load_official_state_dict(tmp_path)
    save_file({"c": torch.ones(1)}, str(tmp_path / "model.safetensors"))  # takes precedence
    assert list(load_official_state_dict(tmp_path)) == ["c"]


GPT2_SIZED = {"vocab_size": 50304, "embedding_dim": 16, "num_blocks": 1, "context_length": CONTEXT,
              "mlstm_block": {"mlstm": {"num_heads": 2}}}


def test_gpt2_tokenizer_when_asked(tmp_path):
    spec = GPT2_SIZED
    official = build_official(spec)
    src = write_checkpoint(tmp_path / "official", spec, official_state_dict(official))
    lines = []
    out = convert_official_checkpoint(src, tmp_path / "hf", dtype=torch.bfloat16, progress=lines.append,
                                      tokenizer="gpt2")
    assert lines and (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id == 50256 and tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == 50256
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert ours.config.eos_token_id == 50256
    ids = torch.randint(0, 50304, (1, 20))
    with torch.no_grad():  # bf16 weights: loose check only
        assert max_rel_err(ours(ids).logits, official(ids)) < 5e-2


def test_cli_tokenizer_flag(tmp_path, capsys, caplog):
    """`xlstm-hf convert --tokenizer gpt2` ships GPT-2's tokenizer; the default writes none for a GPT-2-sized
    vocabulary that does not say whose it is (and says how to get one); --tokenizer with --to transformers
    is refused before anything loads."""
    from xlstm_hf.cli import main

    src = write_checkpoint(tmp_path / "official", GPT2_SIZED, official_state_dict(build_official(GPT2_SIZED)))
    assert main(["convert", str(src), str(tmp_path / "gpt2"), "--tokenizer", "gpt2"]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "gpt2").eos_token_id == 50256
    assert main(["convert", str(src), str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "tokenizer.json").exists()
    assert "no tokenizer was written" in caplog.text and "xlstm-hf convert --tokenizer gpt2" in caplog.text
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(src), str(tmp_path / "back"), "--to", "transformers", "--tokenizer", "gpt2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "xlstm-hf convert: error: --tokenizer applies to conversions into xlstm_hf only"


def test_small_vocab_has_no_tokenizer(tmp_path):
    official = build_official(MLSTM_ONLY)
    src = write_checkpoint(tmp_path / "official", MLSTM_ONLY, official_state_dict(official))
    out = convert_official_checkpoint(src, tmp_path / "hf")
    assert not (out / "tokenizer.json").exists()
    assert (out / "generation_config.json").is_file() and (out / "config.json").is_file()


@pytest.mark.slow
def test_paper_like_config(tmp_path):
    """Official defaults at a larger width, GPT-2 vocabulary, CUDA layout, 4 of our chunks."""
    spec = {"vocab_size": 50304, "embedding_dim": 256, "num_blocks": 8, "context_length": 256, "slstm_at": [1, 5],
            "mlstm_block": {"mlstm": {}}, "slstm_block": {"slstm": {}, "feedforward": {}}}
    official = build_official(spec, seed=5)
    src = write_checkpoint(tmp_path / "official", spec, official_state_dict(official, slstm_layout="cuda"), backend=None)
    ours = load_converted(convert_official_checkpoint(src, tmp_path / "hf"))
    ids = torch.randint(0, 50304, (2, 256), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        err = max_rel_err(ours(ids).logits, official(ids))
    print(f"paper-like config: max rel err {err:.1e}")
    assert err <= TOLERANCE


# --------------------------------------------------------------------------------------------------
# Tokenizer: shipped only when the source or the user says which
# --------------------------------------------------------------------------------------------------

NO_TOKENIZER = "no tokenizer was written"


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and r.name.endswith("conversion.official")]


def test_gpt2_sized_vocabulary_gets_no_guessed_tokenizer(tmp_path, caplog):
    """50304 is GPT-2's padded vocabulary, but also GPT-NeoX's: without tokenizer files in the source and
    without tokenizer="gpt2", no tokenizer is written, no GPT-2 ids are set, and one warning says how to get one."""
    official = build_official(GPT2_SIZED)
    src = write_checkpoint(tmp_path / "official", GPT2_SIZED, official_state_dict(official))
    with caplog.at_level("WARNING"):
        out = convert_official_checkpoint(src, tmp_path / "hf")
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    ours = load_converted(out)
    assert (ours.config.bos_token_id, ours.config.eos_token_id, ours.config.pad_token_id) == (None, None, None)
    (message,) = warnings_of(caplog)
    assert message == (f"{NO_TOKENIZER} to {out}: {src} holds no tokenizer files and its config.yaml does not say "
                       "which tokenizer the model was trained with (vocab_size 50304 fits GPT-2's 50257 tokens, but "
                       "also GPT-NeoX's and others); if the model was trained with GPT-2's tokenizer, convert with "
                       "tokenizer='gpt2' (xlstm-hf convert --tokenizer gpt2); else save the model's tokenizer into "
                       f"{out} (tokenizer.save_pretrained)")
    assert_same_logits(ours, official, GPT2_SIZED["vocab_size"])


def test_tokenizer_stored_with_the_source_is_copied(tmp_path, caplog):
    official = build_official(GPT2_SIZED)
    src = write_checkpoint(tmp_path / "official", GPT2_SIZED, official_state_dict(official))
    xlstm_hf.load_gpt2_tokenizer().save_pretrained(src)
    with caplog.at_level("WARNING"):
        out = convert_official_checkpoint(src, tmp_path / "hf")
    assert not warnings_of(caplog)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    ours = load_converted(out)
    assert (ours.config.bos_token_id, ours.config.eos_token_id, ours.config.pad_token_id) == (50256, 50256, 50256)
    assert_same_logits(ours, official, GPT2_SIZED["vocab_size"])


def test_tokenizer_choices(tmp_path, caplog):
    official = build_official(MLSTM_ONLY)
    src = write_checkpoint(tmp_path / "official", MLSTM_ONLY, official_state_dict(official))
    with caplog.at_level("WARNING"):
        out = convert_official_checkpoint(src, tmp_path / "none", tokenizer=None)  # the user says: none
    assert not warnings_of(caplog) and not (out / "tokenizer.json").exists()
    with caplog.at_level("WARNING"):
        out = convert_official_checkpoint(src, tmp_path / "auto")
    (message,) = warnings_of(caplog)
    assert message == (f"{NO_TOKENIZER} to {out}: {src} holds no tokenizer files and its config.yaml does not name "
                       f"one; save the model's tokenizer into {out} (tokenizer.save_pretrained)")
    with pytest.raises(ValueError, match=r"tokenizer='gpt2': GPT-2's tokenizer has 50257 tokens, more than the "
                                         r"vocabulary of this checkpoint \(vocab_size 97\)"):
        convert_official_checkpoint(src, tmp_path / "gpt2", tokenizer="gpt2")
    with pytest.raises(ValueError, match=r"tokenizer must be one of \('auto', 'gpt2', None\), got 'bert'"):
        convert_official_checkpoint(src, tmp_path / "bert", tokenizer="bert")
    xlstm_hf.load_gpt2_tokenizer().save_pretrained(src)  # not this 97-token model's tokenizer
    with pytest.raises(ValueError, match=r"has bos 50256, eos 50256, pad 50256 outside the model's vocabulary"):
        convert_official_checkpoint(src, tmp_path / "other")
    assert not (tmp_path / "gpt2").exists() and not (tmp_path / "other").exists()


# --------------------------------------------------------------------------------------------------
# Unreadable weights, failed conversions
# --------------------------------------------------------------------------------------------------


def test_unreadable_weights_are_one_line_errors(tmp_path, capsys):
    """Truncated or corrupt weight files, missing tensors and wrong shapes: exit code 2 and one line on stderr
    that names the file and the problem."""
    official = build_official(MLSTM_ONLY)
    sd = official_state_dict(official)
    key = "xlstm_block_stack.blocks.1.xlstm.proj_up.weight"
    torch_file = tmp_path / "ckpt.pt"
    torch.save(sd, torch_file)
    cases = []  # (folder, weights file, message)

    def folder_with(name, weights_name, data):
        folder = write_checkpoint(tmp_path / name, MLSTM_ONLY, {"x": torch.zeros(1)})
        (folder / "model.safetensors").unlink()
        (folder / weights_name).write_bytes(data)
        return folder, folder / weights_name

    save_file(sd, str(tmp_path / "whole.safetensors"))
    safetensors_bytes = (tmp_path / "whole.safetensors").read_bytes()
    cases.append((*folder_with("truncated", "model.safetensors", safetensors_bytes[:-64]),
                  "not a readable safetensors file (SafetensorError: Error while deserializing header: incomplete "
                  "metadata, file not fully covered)"))
    cases.append((*folder_with("truncated-pt", "ckpt.pt", torch_file.read_bytes()[:4000]),
                  "not a readable PyTorch file (RuntimeError: PytorchStreamReader failed reading zip archive"))
    cases.append((*folder_with("junk-pt", "ckpt.pt", b"not a checkpoint" * 8), "not a readable PyTorch file ("))
    cases.append((*folder_with("empty-bin", "weights.bin", b""), "not a readable PyTorch file (EOFError: no details)"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases.append((*folder_with("list-pt", "ckpt.pt", (tmp_path / "list.pt").read_bytes()),
                  "does not hold a mapping of names to tensors"))
    save_file({k: v for k, v in sd.items() if k != key}, str(tmp_path / "missing.safetensors"))
    cases.append((*folder_with("missing", "model.safetensors", (tmp_path / "missing.safetensors").read_bytes()),
                  "backbone.blocks.1.mlstm.up_proj.weight: missing from the official state dict"))
    save_file({**sd, key: sd[key][:, :31].contiguous()}, str(tmp_path / "shape.safetensors"))
    cases.append((*folder_with("shape", "model.safetensors", (tmp_path / "shape.safetensors").read_bytes()),
                  f"{key} -> backbone.blocks.1.mlstm.up_proj.weight: official shape (128, 31), expected (128, 32)"))

    for folder, file, message in cases:
        code, _, err = run_cli(["convert", str(folder), str(tmp_path / "out")], capsys)
        assert code == 2 and err.startswith(f"xlstm-hf convert: error: {file}: {message}"), (folder.name, err)
        assert len(err.strip().splitlines()) == 1, (folder.name, err)
        assert not (tmp_path / "out").exists()


def test_failed_conversion_leaves_the_old_output(tmp_path, monkeypatch):
    """A conversion that fails after the model files are written leaves an earlier conversion's folder as it
    was (and no staging folder); the next successful one replaces it."""
    first, second = build_official(MLSTM_ONLY, seed=1), build_official(MLSTM_ONLY, seed=2)
    out = convert_official_checkpoint(write_checkpoint(tmp_path / "first", MLSTM_ONLY, official_state_dict(first)),
                                      tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = write_checkpoint(tmp_path / "second", MLSTM_ONLY, official_state_dict(second))

    def fail(*args):
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(official_module, "_write_tokenizer", fail)  # after save_pretrained wrote the weights
    with pytest.raises(OSError, match="simulated"):
        convert_official_checkpoint(src, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "out", "second"]
    assert_same_logits(load_converted(out), first, MLSTM_ONLY["vocab_size"])
    monkeypatch.undo()
    convert_official_checkpoint(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "out", "second"]
    assert_same_logits(load_converted(out), second, MLSTM_ONLY["vocab_size"])
    with pytest.raises(ValueError, match="is the source folder"):
        convert_official_checkpoint(src, src)
