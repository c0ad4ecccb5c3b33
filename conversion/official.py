"""Convert checkpoints of the official `xlstm` package (2.0.6, `xLSTMLMModel`) to xlstm_hf.

An official checkpoint folder holds `config.yaml` (an `xLSTMLMModelConfig`, either bare or under the
`model:` key of an experiment YAML) and the weights (`model.safetensors`, or one `.pt`/`.pth`/`.bin`
file). The result is a folder that `AutoModelForCausalLM.from_pretrained` loads after `import xlstm_hf`.

    from xlstm_hf.conversion.official import convert_official_checkpoint
    convert_official_checkpoint("path/to/official", "path/to/out")

The mapping is exact: the converted model computes the same function as the official one. What it has
to undo (see `convert_state_dict`):
- every official LayerNorm / group norm stores `w` and scales by `1 + w`; ours store the scale itself;
- the official sLSTM layer feeds its projection named `fgate` into the cell's input-gate slot and its
  `igate` into the forget-gate slot; ours are named after the slot they feed;
- the official sLSTM cell stores its recurrent kernel and bias in a backend-specific internal layout
  ("vanilla" or "cuda", chosen by `slstm_block.slstm.backend`); ours use the official external layout.

An official config names no tokenizer, so the converted folder gets the tokenizer files stored beside the
checkpoint, GPT-2's when asked for (`tokenizer="gpt2"`), or none (with a warning); see `_tokenizer_plan`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from huggingface_hub.errors import StrictDataclassError
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from transformers.utils import logging as hf_logging

from xlstm_hf import xLSTMConfig, xLSTMForCausalLM
from xlstm_hf.configuration_xlstm import GPT2_EOT_ID

from .large import TOKENIZER_FILES, _copy_tokenizer, _special_token_ids, _unreadable, check_arguments, \
    load_safetensors, staged_output

logger = logging.getLogger(__name__)

GPT2_VOCAB_SIZE = 50257
SLSTM_LAYOUTS = ("vanilla", "cuda")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")
#: prefixes that DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`) add to state-dict keys
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: `tokenizer=` of convert_official_checkpoint
TOKENIZER_CHOICES = ("auto", "gpt2", None)

# --------------------------------------------------------------------------------------------------
# config.yaml -> xLSTMConfig
# --------------------------------------------------------------------------------------------------

# Official field -> our field, per level of the official config. Fields listed in `*_IGNORED` are either
# derived by the official code from other fields (so they carry no information of their own) or do not
# change the function the model computes (shapes/dtypes of the CUDA kernel, optimiser settings).
TOP_LEVEL_FIELDS = {
    "vocab_size": "vocab_size",
    "embedding_dim": "hidden_size",
    "num_blocks": "num_blocks",
    "add_post_blocks_norm": "add_post_blocks_norm",
    "bias": "use_bias",
    "dropout": "dropout",
    "tie_weights": "tie_word_embeddings",
    "add_embedding_dropout": "add_embedding_dropout",
}
TOP_LEVEL_OTHER = {"slstm_at", "mlstm_block", "slstm_block"}  # handled by hand below
TOP_LEVEL_IGNORED = {"context_length", "weight_decay_on_embedding"}

MLSTM_LAYER_FIELDS = {
    "conv1d_kernel_size": "mlstm_conv_kernel_size",
    "qkv_proj_blocksize": "mlstm_qkv_proj_blocksize",
    "num_heads": "mlstm_num_heads",
    "proj_factor": "mlstm_proj_factor",
    "round_proj_up_to_multiple_of": "mlstm_round_up_to",
}
MLSTM_LAYER_CHECKED = {"round_proj_up_dim_up"}
MLSTM_LAYER_IGNORED = {"embedding_dim", "bias", "dropout", "context_length"}  # set from the top level

SLSTM_LAYER_FIELDS = {
    "num_heads": "slstm_num_heads",
    "conv1d_kernel_size": "slstm_conv_kernel_size",
    "bias_init": "slstm_bias_init",
    "recurrent_weight_init": "slstm_recurrent_init",
}
SLSTM_LAYER_CHECKED = {"backend", "function", "forward_clipval", "group_norm_weight", "gradient_recurrent_clipval"}
SLSTM_LAYER_IGNORED = {
    "embedding_dim", "dropout", "hidden_size",  # set from the top level
    "num_states", "num_gates",  # derived from `function`
    "dtype", "dtype_a", "dtype_b", "dtype_g", "dtype_r", "dtype_s", "dtype_w", "enable_automatic_mixed_precision",
    "batch_size", "input_shape", "internal_input_shape", "output_shape", "constants", "initial_val",
    "gradient_recurrent_cut",  # backward only
}

FEEDFORWARD_FIELDS = {
    "proj_factor": "ffn_proj_factor",
    "act_fn": "ffn_act_fn",
    "round_proj_up_to_multiple_of": "ffn_round_up_to",
    "bias": "ffn_use_bias",
}
FEEDFORWARD_CHECKED = {"ff_type", "round_proj_up_dim_up"}
FEEDFORWARD_IGNORED = {"embedding_dim", "dropout"}

# The official dataclass defaults, needed because several of ours differ (e.g. num_blocks 1 vs 24).
OFFICIAL_DEFAULTS = {
    "num_blocks": 1, "embedding_dim": 128, "add_post_blocks_norm": True, "bias": False, "dropout": 0.0,
    "tie_weights": False, "add_embedding_dropout": False,
}
OFFICIAL_MLSTM_DEFAULTS = {
    "conv1d_kernel_size": 4, "qkv_proj_blocksize": 4, "num_heads": 4, "proj_factor": 2.0,
    "round_proj_up_to_multiple_of": 64,
}
OFFICIAL_SLSTM_DEFAULTS = {
    "num_heads": 4, "conv1d_kernel_size": 4, "bias_init": "powerlaw_blockdependent", "recurrent_weight_init": "zeros",
}
OFFICIAL_FEEDFORWARD_DEFAULTS = {"proj_factor": 1.3, "act_fn": "gelu", "round_proj_up_to_multiple_of": 64, "bias": False}
# our field -> the official path it comes from (for error messages)
OFFICIAL_NAMES = {
    **{ours: theirs for theirs, ours in TOP_LEVEL_FIELDS.items()},
    "slstm_at": "slstm_at",
    **{ours: f"mlstm_block.mlstm.{theirs}" for theirs, ours in MLSTM_LAYER_FIELDS.items()},
    **{ours: f"slstm_block.slstm.{theirs}" for theirs, ours in SLSTM_LAYER_FIELDS.items()},
    **{ours: f"slstm_block.feedforward.{theirs}" for theirs, ours in FEEDFORWARD_FIELDS.items()},
}


def load_official_config(src_dir: str | Path) -> dict:
    """The `xLSTMLMModelConfig` mapping from `src_dir/config.yaml`.

    Accepts the bare mapping or an experiment YAML with the model under `model:`. In the latter, whole-value
    interpolations `${a.b.c}` (as in the official experiment files, e.g. `vocab_size:
    ${dataset.kwargs.vocab_size}`) are resolved against the file, and the experiment's run label `name` is
    dropped (the official loader, dacite, ignores it too).
    """
    path = Path(src_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"no config.yaml in {src_dir}")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    if "model" not in raw:
        return raw
    model = raw["model"]
    if not isinstance(model, dict):
        raise ValueError(f"{path}: 'model' must be a mapping, got {type(model).__name__}")
    model = {key: value for key, value in model.items() if key != "name"}
    return _resolve_interpolations(model, raw, "model")


def _resolve_interpolations(node, root: dict, where: str):
    """`node` with every string value of the form `${a.b.c}` replaced by that value of `root`."""
    if isinstance(node, dict):
        return {key: _resolve_interpolations(value, root, f"{where}.{key}") for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve_interpolations(value, root, where) for value in node]
    match = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", node) if isinstance(node, str) else None
    if match is None:
        return node
    value = root
    for part in match.group(1).split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where}: cannot resolve interpolation {node}")
        value = value[part]
    return _resolve_interpolations(value, root, where)


def _check_keys(mapping: dict, where: str, known: set[str]) -> None:
    """Reject keys that are neither known nor official internals (which start with `_`)."""
    for key in mapping:
        if not key.startswith("_") and key not in known:
            raise ValueError(f"{where}{key}: unknown field of the official xLSTM config")


def _section(mapping: dict, key: str, where: str) -> dict:
    """The sub-mapping `mapping[key]` ({} when absent, so that the official defaults apply)."""
    value = mapping.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}{key}: expected a mapping, got {value!r}")
    return value


def _require(ok: bool, where: str, key: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"{where}{key}: {value!r} is not supported ({why})")


def config_from_official(d: dict, token_ids: tuple = (None, None, None)) -> tuple[xLSTMConfig, str]:
    """Our config for an official `xLSTMLMModelConfig` mapping, and the sLSTM parameter layout of its
    checkpoint ("vanilla" or "cuda", from `slstm_block.slstm.backend`; "cuda" when absent, as officially).
    `token_ids` = (bos, eos, pad), which the official config does not hold (see `convert_official_checkpoint`).

    Raises ValueError naming the field for unknown fields and for values our model cannot express.
    """
    _check_keys(d, "", set(TOP_LEVEL_FIELDS) | TOP_LEVEL_OTHER | TOP_LEVEL_IGNORED)
    if "vocab_size" not in d:
        raise ValueError("vocab_size: missing (the official default -1 is a placeholder)")
    top = {**OFFICIAL_DEFAULTS, **d}
    kwargs = {ours: top[theirs] for theirs, ours in TOP_LEVEL_FIELDS.items()}

    # as in the official dataclass, an absent block config is None: no blocks of that type
    has_mlstm = d.get("mlstm_block") is not None
    has_slstm = d.get("slstm_block") is not None
    if not has_mlstm and not has_slstm:
        raise ValueError("mlstm_block, slstm_block: both are null or absent, the model would have no blocks")
    slstm_at = top.get("slstm_at", [])
    if not has_mlstm:  # the official __post_init__ turns every block into an sLSTM block
        slstm_at = "all"
    if slstm_at != "all" and not isinstance(slstm_at, list):
        raise ValueError(f"slstm_at: expected a list of block indices or 'all', got {slstm_at!r}")
    if not has_slstm and slstm_at:
        raise ValueError(f"slstm_at: {slstm_at!r} places sLSTM blocks, but slstm_block is null")
    kwargs["slstm_at"] = slstm_at

    # mLSTM layer
    mlstm = {}
    if has_mlstm:
        block = _section(d, "mlstm_block", "")
        _check_keys(block, "mlstm_block.", {"mlstm"})
        mlstm = _section(block, "mlstm", "mlstm_block.")
        where = "mlstm_block.mlstm."
        _check_keys(mlstm, where, set(MLSTM_LAYER_FIELDS) | MLSTM_LAYER_CHECKED | MLSTM_LAYER_IGNORED)
        value = mlstm.get("round_proj_up_dim_up", True)
        _require(value is True, where, "round_proj_up_dim_up", value, "our inner width is always rounded up")
    kwargs.update({ours: {**OFFICIAL_MLSTM_DEFAULTS, **mlstm}[theirs] for theirs, ours in MLSTM_LAYER_FIELDS.items()})

    # sLSTM layer and its feed-forward
    slstm, feedforward, layout = {}, {}, "cuda"
    if has_slstm:
        block = _section(d, "slstm_block", "")
        _check_keys(block, "slstm_block.", {"slstm", "feedforward"})
        slstm = _section(block, "slstm", "slstm_block.")
        where = "slstm_block.slstm."
        _check_keys(slstm, where, set(SLSTM_LAYER_FIELDS) | SLSTM_LAYER_CHECKED | SLSTM_LAYER_IGNORED)
        layout = slstm.get("backend", "cuda")
        _require(layout in SLSTM_LAYOUTS, where, "backend", layout, f"expected one of {SLSTM_LAYOUTS}")
        value = slstm.get("function", "slstm")
        _require(value == "slstm", where, "function", value, "only the sLSTM cell is implemented")
        value = slstm.get("forward_clipval")
        _require(value is None, where, "forward_clipval", value, "our sLSTM does not clip its output")
        value = slstm.get("group_norm_weight", True)
        _require(value is True, where, "group_norm_weight", value, "our sLSTM group norm always has a weight")
        # The official CUDA kernel is compiled with its *forward* clip set from gradient_recurrent_clipval
        # (the vanilla backend ignores it). Since |h| = sigmoid(o) |c / n| < 1, a clip at >= 1 never acts.
        value = slstm.get("gradient_recurrent_clipval")
        clips = value is not None and not (isinstance(value, (int, float)) and value >= 1)
        _require(layout == "vanilla" or not clips, where, "gradient_recurrent_clipval", value,
                 "the official CUDA kernel clips the sLSTM output at this value, which our model does not")

        if "feedforward" in block and block["feedforward"] is None:
            raise ValueError("slstm_block.feedforward: null is not supported (our sLSTM blocks always have one)")
        feedforward = _section(block, "feedforward", "slstm_block.")
        where = "slstm_block.feedforward."
        _check_keys(feedforward, where, set(FEEDFORWARD_FIELDS) | FEEDFORWARD_CHECKED | FEEDFORWARD_IGNORED)
        value = feedforward.get("ff_type", "ffn_gated")
        _require(value == "ffn_gated", where, "ff_type", value, "only the gated feed-forward is implemented")
        value = feedforward.get("round_proj_up_dim_up", True)
        _require(value is True, where, "round_proj_up_dim_up", value, "our width is always rounded up")
    kwargs.update({ours: {**OFFICIAL_SLSTM_DEFAULTS, **slstm}[theirs] for theirs, ours in SLSTM_LAYER_FIELDS.items()})
    kwargs.update(
        {ours: {**OFFICIAL_FEEDFORWARD_DEFAULTS, **feedforward}[theirs] for theirs, ours in FEEDFORWARD_FIELDS.items()}
    )

    kwargs.update(zip(("bos_token_id", "eos_token_id", "pad_token_id"), token_ids))
    try:
        config = xLSTMConfig(**kwargs)
    except (StrictDataclassError, ValueError) as e:
        # our validation names our fields; add the official names they come from
        names = [f"{ours} is official {theirs}" for ours, theirs in OFFICIAL_NAMES.items()
                 if re.search(rf"\b{ours}\b", str(e))]
        raise ValueError(f"invalid official config: {e}" + (f" ({'; '.join(names)})" if names else "")) from None
    return config, layout


# --------------------------------------------------------------------------------------------------
# state dict: official names and layouts -> ours
# --------------------------------------------------------------------------------------------------


def _same(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t


def _residual_scale(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Official norms scale by `1 + w`; ours by the stored weight. Computed in at least float32, where
    `1 + w` is exact for 16-bit `w`, so that casting to any dtype afterwards rounds only once."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) + 1


def _check_source_shape(t: torch.Tensor, expected: tuple[int, ...]) -> None:
    # checked before reshaping: a tensor of the other layout has the same number of elements
    if tuple(t.shape) != expected:
        raise ValueError(f"official shape {tuple(t.shape)}, expected {expected}")


def _kernel_from_vanilla(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(NH, 4*DH, DH) with [h, g*DH + d, j] -> ours (NH, DH, 4, DH) with [h, j, g, d]."""
    NH, DH, G, _ = shape
    _check_source_shape(t, (NH, G * DH, DH))
    return t.reshape(NH, G, DH, DH).permute(0, 3, 1, 2)


def _kernel_from_cuda(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(NH, DH, 4*DH) with [h, j, g*DH + d] -> ours (NH, DH, 4, DH)."""
    NH, DH, G, _ = shape
    _check_source_shape(t, (NH, DH, G * DH))
    return t.reshape(NH, DH, G, DH)


def _bias_from_vanilla(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(4*NH*DH,) gate-major -> ours (NH, 4, DH)."""
    NH, G, DH = shape
    _check_source_shape(t, (G * NH * DH,))
    return t.reshape(G, NH, DH).permute(1, 0, 2)


def _bias_from_cuda(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(NH*4*DH,) head-major -> ours (NH, 4, DH)."""
    NH, G, DH = shape
    _check_source_shape(t, (NH * G * DH,))
    return t.reshape(NH, G, DH)


# transform names used in the tables -> function(official tensor, our shape), per sLSTM layout
TRANSFORMS = {
    layout: {"same": _same, "scale": _residual_scale, "slstm_kernel": kernel, "slstm_bias": bias}
    for layout, kernel, bias in (
        ("vanilla", _kernel_from_vanilla, _bias_from_vanilla),
        ("cuda", _kernel_from_cuda, _bias_from_cuda),
    )
}

# (official name regex, our name template, transform). Block tables are relative to the block prefix
# (`xlstm_block_stack.blocks.{j}.` -> `backbone.blocks.{j}.`); which table applies depends on the block type.
TOP_LEVEL_RENAMES = [
    (r"token_embedding\.weight", "backbone.embeddings.weight", "same"),
    (r"xlstm_block_stack\.post_blocks_norm\.weight", "backbone.final_norm.weight", "scale"),
    (r"lm_head\.weight", "lm_head.weight", "same"),
]
MLSTM_BLOCK_RENAMES = [
    (r"xlstm_norm\.weight", "norm.weight", "scale"),
    (r"xlstm\.proj_up\.(weight|bias)", r"mlstm.up_proj.\1", "same"),
    (r"xlstm\.conv1d\.conv\.(weight|bias)", r"mlstm.conv.\1", "same"),
    (r"xlstm\.([qkv])_proj\.(weight|bias)", r"mlstm.\1_proj.\2", "same"),
    (r"xlstm\.mlstm_cell\.([if]gate)\.(weight|bias)", r"mlstm.\1.\2", "same"),
    (r"xlstm\.mlstm_cell\.outnorm\.weight", "mlstm.out_norm.weight", "scale"),
    (r"xlstm\.learnable_skip", "mlstm.learnable_skip", "same"),
    (r"xlstm\.proj_down\.(weight|bias)", r"mlstm.down_proj.\1", "same"),
]
SLSTM_BLOCK_RENAMES = [
    (r"xlstm_norm\.weight", "norm.weight", "scale"),
    (r"xlstm\.conv1d\.conv\.(weight|bias)", r"slstm.conv.\1", "same"),
    # the official layer feeds `fgate` into the cell's input-gate slot and `igate` into the forget-gate slot
    (r"xlstm\.fgate\.weight", "slstm.igate.weight", "same"),
    (r"xlstm\.igate\.weight", "slstm.fgate.weight", "same"),
    (r"xlstm\.([zo]gate)\.weight", r"slstm.\1.weight", "same"),
    (r"xlstm\.slstm_cell\._recurrent_kernel_", "slstm.recurrent_kernel", "slstm_kernel"),
    (r"xlstm\.slstm_cell\._bias_", "slstm.bias", "slstm_bias"),
    (r"xlstm\.group_norm\.weight", "slstm.group_norm.weight", "scale"),
    (r"ffn_norm\.weight", "ffn_norm.weight", "scale"),
    (r"ffn\.proj_up\.(weight|bias)", r"ffn.up_proj.\1", "same"),
    (r"ffn\.proj_down\.(weight|bias)", r"ffn.down_proj.\1", "same"),
]
BLOCK_RENAMES = {"m": MLSTM_BLOCK_RENAMES, "s": SLSTM_BLOCK_RENAMES}
BLOCK_PREFIX = re.compile(r"xlstm_block_stack\.blocks\.(\d+)\.(.+)")


def rename_official_key(key: str, config: xLSTMConfig) -> tuple[str, str] | None:
    """Our name and the transform name for an official state-dict key, or None if it maps to nothing."""
    table, rest, prefix = TOP_LEVEL_RENAMES, key, ""
    block = BLOCK_PREFIX.fullmatch(key)
    if block is not None:
        j = int(block.group(1))
        if j >= config.num_blocks:
            return None
        table, rest, prefix = BLOCK_RENAMES[config.block_types[j]], block.group(2), f"backbone.blocks.{j}."
    for pattern, target, transform in table:
        match = re.fullmatch(pattern, rest)
        if match is not None:
            return prefix + match.expand(target), transform
    return None


def expected_shapes(config: xLSTMConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor our model stores (tied `lm_head.weight` excluded)."""
    with torch.device("meta"):
        model = xLSTMForCausalLM(config)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def convert_state_dict(
    sd: dict[str, torch.Tensor], config: xLSTMConfig, slstm_layout: str
) -> dict[str, torch.Tensor]:
    """Official `xLSTMLMModel` state dict -> ours (names, norm scales, sLSTM gate slots and layouts).

    `slstm_layout` is the official sLSTM backend the checkpoint was saved with ("vanilla" or "cuda"; see
    `config_from_official`). For tied embeddings `lm_head.weight` may be absent or equal to the embedding
    and is left out of the result (the model ties it). Dtypes are kept, except that norm weights come out in
    at least float32 (see `_residual_scale`); every tensor is contiguous.

    Raises ValueError naming the key for an official key that maps to nothing, a key our model needs that
    the source lacks, and a shape mismatch.
    """
    if slstm_layout not in SLSTM_LAYOUTS:
        raise ValueError(f"slstm_layout must be one of {SLSTM_LAYOUTS}, got {slstm_layout!r}")
    transforms = TRANSFORMS[slstm_layout]
    shapes = expected_shapes(config)
    out = {}
    for key, tensor in sd.items():
        renamed = rename_official_key(key, config)
        if renamed is None:
            raise ValueError(f"{key}: unknown official parameter (no counterpart in our {config.layout} model "
                             f"with block types {''.join(config.block_types)})")
        name, transform = renamed
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # checked against the embedding below
        try:
            converted = transforms[transform](tensor, shapes[name])
        except ValueError as e:
            raise ValueError(f"{key} -> {name}: {e}") from None
        if converted.shape != shapes[name]:
            raise ValueError(f"{key} -> {name}: official shape {tuple(tensor.shape)}, expected {tuple(shapes[name])}")
        out[name] = converted.contiguous()
    missing = [name for name in shapes if name not in out]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the official state dict"
                         + (f" (and {len(missing) - 1} more: {missing[1:]})" if len(missing) > 1 else ""))
    head = sd.get("lm_head.weight")
    if config.tie_word_embeddings and head is not None and not torch.equal(head, sd["token_embedding.weight"]):
        raise ValueError("lm_head.weight: differs from token_embedding.weight, but the config ties them")
    return out


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def official_weights_file(src_dir: str | Path) -> Path:
    """The weights file of the official checkpoint in `src_dir`: `model.safetensors`, else the one
    `*.pt|*.pth|*.bin` file."""
    src_dir = Path(src_dir)
    if (src_dir / "model.safetensors").is_file():
        return src_dir / "model.safetensors"
    candidates = sorted(p for p in src_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(candidates) != 1:
        found = [p.name for p in candidates] or sorted(p.name for p in src_dir.iterdir())
        raise ValueError(f"{src_dir}: expected model.safetensors or exactly one {'/'.join(WEIGHT_SUFFIXES)} "
                         f"file, found {found}")
    return candidates[0]


def load_official_state_dict(src_dir: str | Path) -> dict[str, torch.Tensor]:
    """The official state dict in `src_dir` (from `official_weights_file`).

    A training checkpoint `{"state_dict": sd, ...}` or `{"model": sd, ...}` is unwrapped, and the prefixes
    added by DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`) are stripped. A file that
    cannot be read raises ValueError naming it.
    """
    path = official_weights_file(src_dir)
    if path.suffix == ".safetensors":
        sd = load_safetensors(path)
    else:
        try:  # weights_only: never run code from a checkpoint file
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file fails with RuntimeError, EOFError, KeyError, UnpicklingError, ...
            raise _unreadable(path, e) from None
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
                break
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError(f"{path}: does not hold a mapping of names to tensors")
    sd = dict(sd)
    # wrappers nest (a compiled DDP model has "_orig_mod.module."): strip until no key has a prefix left
    while any(key.startswith(WRAPPER_PREFIXES) for key in sd):
        for prefix in WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(sd, prefix)
    return sd


@contextmanager
def _no_progress_bars():
    """Silence transformers' tqdm bars (save_pretrained draws one) for the duration; we report via `progress`."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _tokenizer_plan(src_dir: Path, vocab_size, tokenizer: str | None, say) -> tuple[str | None, tuple]:
    """Which tokenizer the converted folder gets ("gpt2", "source" or None) and its (bos, eos, pad) ids.

    An official config.yaml never names its tokenizer (xLSTMLMModelConfig has no such field, and the
    experiment YAMLs' `dataset` section names a dataset, not a tokenizer), and a vocabulary of 50257 or
    more is not necessarily GPT-2's (50304 is also GPT-NeoX's padded one): "auto" takes the tokenizer files
    stored in the source folder, if any, and ships none otherwise. "gpt2" ships GPT-2's; None ships none.
    """
    if tokenizer == "gpt2":
        if isinstance(vocab_size, int) and vocab_size < GPT2_VOCAB_SIZE:
            raise ValueError(f"tokenizer='gpt2': GPT-2's tokenizer has {GPT2_VOCAB_SIZE} tokens, more than the "
                             f"vocabulary of this checkpoint (vocab_size {vocab_size})")
        return "gpt2", (GPT2_EOT_ID,) * 3
    if tokenizer == "auto" and any((src_dir / name).is_file() for name in TOKENIZER_FILES):
        return "source", _special_token_ids(src_dir, say, vocab_size)
    return None, (None, None, None)


def _no_tokenizer_warning(src_dir: Path, out_dir: Path, vocab_size: int) -> str:
    """The warning for an "auto" conversion that found no tokenizer: why, and how to get one."""
    how = f"save the model's tokenizer into {out_dir} (tokenizer.save_pretrained)"
    if vocab_size >= GPT2_VOCAB_SIZE:
        how = (f"if the model was trained with GPT-2's tokenizer, convert with tokenizer='gpt2' (xlstm-hf convert "
               f"--tokenizer gpt2); else {how}")
        why = (f"its config.yaml does not say which tokenizer the model was trained with (vocab_size {vocab_size} "
               f"fits GPT-2's {GPT2_VOCAB_SIZE} tokens, but also GPT-NeoX's and others)")
    else:
        why = "its config.yaml does not name one"
    return f"no tokenizer was written to {out_dir}: {src_dir} holds no tokenizer files and {why}; {how}"


def convert_official_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[str], None] | None = None,
    tokenizer: str | None = "auto",
) -> Path:
    """Convert the official checkpoint in `src_dir` into a Hugging Face model folder `out_dir`.

    Writes config.json, generation_config.json and model.safetensors, and a tokenizer: with
    `tokenizer="auto"` the tokenizer files stored in `src_dir` (bos/eos/pad ids from them), else none, with
    a warning; `"gpt2"`: GPT-2's (ids 50256); None: none. `dtype` defaults to the checkpoint's (that of the
    token embedding). `progress` receives one line per step. The output is written to a folder next to
    `out_dir` and moved into place at the end: a failed conversion leaves `out_dir` as it was. Returns
    `out_dir` as a Path.
    """
    say = progress or logger.info
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if tokenizer not in TOKENIZER_CHOICES:  # before anything is read
        raise ValueError(f"tokenizer must be one of {TOKENIZER_CHOICES}, got {tokenizer!r}")
    check_arguments(src_dir, out_dir, dtype)
    d = load_official_config(src_dir)
    plan, token_ids = _tokenizer_plan(src_dir, d.get("vocab_size"), tokenizer, say)
    config, layout = config_from_official(d, token_ids)
    say(f"config: {config.layout}, {config.num_blocks} blocks, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, sLSTM layout {layout}")
    weights_file = official_weights_file(src_dir)
    official = load_official_state_dict(src_dir)
    say(f"loaded {len(official)} official tensors")
    try:
        sd = convert_state_dict(official, config, layout)
    except ValueError as e:
        raise ValueError(f"{weights_file}: {e}") from None
    dtype = dtype or sd["backbone.embeddings.weight"].dtype
    sd = {name: t.to(dtype) for name, t in sd.items()}
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["backbone.embeddings.weight"]

    # Built on the meta device (no random init) and filled by assignment, which checks names and shapes.
    with torch.device("meta"):
        model = xLSTMForCausalLM(config)
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()  # assignment gave the head its own Parameter object
    model.eval()

    with staged_output(out_dir) as staging:
        with _no_progress_bars():
            model.save_pretrained(staging)
        say(f"saved the model to {out_dir}")
        _write_tokenizer(plan, src_dir, staging, say)
    if plan is None and tokenizer == "auto":
        logger.warning(_no_tokenizer_warning(src_dir, out_dir, config.vocab_size))
    return out_dir


def _write_tokenizer(plan: str | None, src_dir: Path, out_dir: Path, say) -> None:
    """The tokenizer of `_tokenizer_plan` into `out_dir`."""
    if plan == "gpt2":
        from xlstm_hf.tokenization import load_gpt2_tokenizer

        load_gpt2_tokenizer().save_pretrained(out_dir)
        say("saved the GPT-2 tokenizer")
    elif plan == "source":
        _copy_tokenizer(src_dir, out_dir, say)


__all__ = [
    "config_from_official",
    "convert_official_checkpoint",
    "convert_state_dict",
    "load_official_config",
    "load_official_state_dict",
    "official_weights_file",
]
