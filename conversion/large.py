"""Convert xLSTM-7B-style checkpoints (the mLSTM-only "large" design) to xlstm_hf, and back.

Sources:
- a **transformers xLSTM folder** (model_type "xlstm", e.g. NX-AI/xLSTM-7b as downloaded from the Hub):
  `config.json` + `model.safetensors`, or shards listed in `model.safetensors.index.json`; weights in
  transformers' names, `weight_mode` "single" or "fused";
- an **NX-AI `xlstm_large` folder** (what `xlstm.xlstm_large.from_pretrained.load_from_pretrained` reads):
  `config.yaml` (the `xLSTMLargeConfig` fields) + `model.safetensors`, or shards `model_0.safetensors`,
  `model_1.safetensors`, ...; weights in the names of `xlstm.xlstm_large.model.xLSTMLarge`.
Both become a folder of our `block_design="large"` model that `xLSTMForCausalLM.from_pretrained` (and
`AutoModelForCausalLM` after `import xlstm_hf`) loads. `export_to_transformers` writes our large-design
checkpoints back as a transformers xLSTM folder, losslessly.

    from xlstm_hf.conversion.large import convert_checkpoint, export_to_transformers
    convert_checkpoint("xlstm-7b", "xlstm-7b-hf")               # any supported source format
    export_to_transformers("xlstm-7b-hf", "xlstm-7b-back", weight_mode="fused")

The mapping is a renaming plus row-wise splits and concatenations: every norm weight is the actual scale in
all three formats, so no value changes (unless `dtype=` is asked). What differs:
- ours keeps q, k, v, the output gate and the input / forget gates as separate tensors; "fused" sources
  stack them row-wise in `qkv_opreact` ([q | k | v | o]) and `ifgate_preact` ([i | f]);
- our feed-forward up-projection is one tensor [gate | up]; "single" sources hold `proj_up_gate` and
  `proj_up`, "fused" ones `proj_up_gate_z` (the same stacking as ours);
- the sources truncate q/k and v widths and round the feed-forward width down where ours rounds up
  (`their_widths`); where the two differ, the converted config states the source's widths
  (`mlstm_qk_dim_override`, `mlstm_v_dim_override`, `ffn_dim_override`), and export writes them back.

Streaming: the weights are never loaded as a whole. Source shards are opened one at a time with
`safetensors.safe_open`, each output tensor is assembled from (slices of) its source tensors as soon as
the last of them has been read, and written straight into the output shard, whose header is planned up
front. Peak memory is about one source shard (the pages `safe_open` maps) plus one tensor; the parts of a
fused tensor whose pieces live in different shards wait in memory until their last piece is read.

Every converter writes into a staging folder next to the output folder and moves the files into place
only at the end (`staged_output`): a conversion that fails leaves an existing output folder as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.errors import StrictDataclassError

from xlstm_hf import xLSTMConfig, xLSTMForCausalLM
from xlstm_hf.configuration_xlstm import round_up_dim

logger = logging.getLogger(__name__)

FORMATS = ("official", "transformers", "xlstm_large", "xlstm_hf")
WEIGHT_MODES = ("single", "fused")
DEFAULT_MAX_SHARD_SIZE = "5GB"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
#: tokenizer files copied from the source folder when present
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)

# safetensors dtype codes <-> torch dtypes
_DTYPE_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES_OF_DTYPES = {dtype: code for code, dtype in _DTYPE_CODES.items()}

# --------------------------------------------------------------------------------------------------
# Which format is a folder?
# --------------------------------------------------------------------------------------------------


def _read_mapping(path: Path) -> dict:
    """The mapping in a .json or .yaml file; a clear error for a malformed file or a non-mapping."""
    kind, load, error = ("JSON", json.load, json.JSONDecodeError) if path.suffix == ".json" else \
        ("YAML", yaml.safe_load, yaml.YAMLError)
    try:
        with open(path, encoding="utf-8") as f:
            value = load(f)
    except error as e:
        raise ValueError(f"{path}: not valid {kind} ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(value).__name__}")
    return value


def _looks_like_xlstm_large(d: dict) -> bool:
    """An `xLSTMLargeConfig` mapping (top-level `num_heads`) rather than an official `xLSTMLMModelConfig`
    (whose heads are per block type, under `mlstm_block` / `slstm_block`, possibly under `model:`)."""
    return "num_heads" in d and not any(key in d for key in ("model", "mlstm_block", "slstm_block"))


def unknown_format_message(src: str | Path) -> str:
    src = Path(src)
    found = sorted(p.name for p in src.iterdir())[:12] if src.is_dir() else []
    return (f"{src}: unknown checkpoint format: looked for config.json (model_type 'xlstm' for a transformers "
            f"xLSTM folder, 'xlstm_paper' for xlstm_hf) and config.yaml (an xlstm_large xLSTMLargeConfig, or an "
            f"official xlstm xLSTMLMModelConfig); found {found or 'an empty folder'}")


def detect_format(src: str | Path, strict: bool = True) -> str | None:
    """The format of the checkpoint folder `src`: "transformers", "xlstm_hf", "xlstm_large" or "official".

    Decided by the config file: `config.json` with model_type "xlstm" (transformers) or "xlstm_paper"
    (ours); else `config.yaml` holding an `xLSTMLargeConfig` (top-level `num_heads`) or an official
    `xLSTMLMModelConfig`. A folder with neither file raises ValueError naming what was looked for (or gives
    None with `strict=False`); so does a config.json of another model type (always).
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {src}")
    if (src / "config.json").is_file():
        model_type = _read_mapping(src / "config.json").get("model_type")
        if model_type == "xlstm":
            return "transformers"
        if model_type == xLSTMConfig.model_type:
            return "xlstm_hf"
        raise ValueError(f"{src / 'config.json'}: model_type {model_type!r} is not an xLSTM checkpoint "
                         f"(expected 'xlstm' for transformers' xLSTM or '{xLSTMConfig.model_type}' for xlstm_hf)")
    if (src / "config.yaml").is_file():
        return "xlstm_large" if _looks_like_xlstm_large(_read_mapping(src / "config.yaml")) else "official"
    if strict:
        raise ValueError(unknown_format_message(src))
    return None


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def their_widths(hidden: int, qk_factor: float, v_factor: float, ffn_factor: float,
                 ffn_round: int) -> tuple[int, int, int]:
    """The q/k, v and feed-forward widths as transformers' xLSTM and xlstm_large compute them: q/k and v
    truncate hidden * factor (`int()`); the feed-forward takes (x + m - 1) // m * m of the float
    x = hidden * factor, which is below our ceil(x / m) * m when x lies less than 1 above a multiple of m."""
    ffn = int((hidden * ffn_factor + ffn_round - 1) // ffn_round * ffn_round)
    return int(hidden * qk_factor), int(hidden * v_factor), ffn


def _large_config(where: str, names: dict[str, str], *, hidden: int, heads: int, blocks: int, vocab: int,
                  use_bias: bool, norm_eps: float, qk_factor: float, v_factor: float, ffn_factor: float,
                  ffn_round: int, gate_cap, logits_cap, eps: float, chunk_size: int, out_norm: bool,
                  token_ids: tuple, use_cache: bool = True) -> xLSTMConfig:
    """Our large-design config for a source's hyperparameters; `names` maps ours to the source's field names
    (for messages). The widths are the source's (`their_widths`): where our rounding rule (q/k and v rounded
    up to a multiple of `mlstm_round_up_to`, 1 here) gives another, the config states the width explicitly
    (`mlstm_qk_dim_override`, `mlstm_v_dim_override`, `ffn_dim_override`)."""
    try:
        qk, v, ffn = their_widths(hidden, qk_factor, v_factor, ffn_factor, ffn_round)
    except (TypeError, ZeroDivisionError):  # not a positive number; the config below names the field
        qk = v = ffn = None
    # override -> (factor, our rounding multiple, the source's width)
    rules = {"mlstm_qk_dim_override": (qk_factor, 1, qk), "mlstm_v_dim_override": (v_factor, 1, v),
             "ffn_dim_override": (ffn_factor, ffn_round, ffn)}
    overrides = {name: width for name, (factor, multiple, width) in rules.items()
                 if width is not None and width != round_up_dim(hidden, factor, multiple)}
    bos, eos, pad = token_ids
    kwargs = dict(
        block_design="large", vocab_size=vocab, hidden_size=hidden, num_blocks=blocks, slstm_at=[],
        mlstm_num_heads=heads, qk_dim_factor=qk_factor, v_dim_factor=v_factor, mlstm_round_up_to=1,
        ffn_proj_factor=ffn_factor, ffn_round_up_to=ffn_round, ffn_act_fn="swish", use_bias=use_bias,
        ffn_use_bias=use_bias, gate_soft_cap=gate_cap, logits_soft_cap=logits_cap, norm_eps=norm_eps, mlstm_eps=eps,
        add_post_blocks_norm=out_norm, tie_word_embeddings=False, chunk_size=chunk_size, use_cache=use_cache,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **overrides,
    )
    try:
        return xLSTMConfig(**kwargs)
    except (StrictDataclassError, ValueError, TypeError) as e:
        notes = [f"{o} is {t}" for o, t in names.items() if re.search(rf"\b{o}\b", str(e))]
        # where the heads do not divide a truncated width, say where it comes from (the source cannot run it either)
        truncated = (("qk_dim_factor", "q/k", qk_factor, qk), ("v_dim_factor", "v", v_factor, v))
        notes += [f"{names.get(name, name)}={factor} gives a width of {hidden * factor} for hidden size {hidden}, "
                  f"which the source truncates to {width} and cannot split into its heads either"
                  for name, label, factor, width in truncated
                  if width is not None and width != hidden * factor and f"{label} width {width}" in str(e)]
        raise ValueError(f"{where}: not expressible as an xlstm_hf config: {e}"
                         + (f" ({'; '.join(notes)})" if notes else "")) from None


TRANSFORMERS_NAMES = {  # our field -> transformers' xLSTMConfig field
    "hidden_size": "hidden_size", "num_blocks": "num_blocks", "mlstm_num_heads": "num_heads", "vocab_size": "vocab_size",
    "use_bias": "use_bias", "norm_eps": "norm_eps", "qk_dim_factor": "qk_dim_factor", "v_dim_factor": "v_dim_factor",
    "ffn_proj_factor": "ffn_proj_factor", "ffn_round_up_to": "ffn_round_up_to_multiple_of",
    "gate_soft_cap": "gate_soft_cap", "logits_soft_cap": "output_logit_soft_cap", "mlstm_eps": "eps",
    "chunk_size": "chunk_size",
}
XLSTM_LARGE_NAMES = {**TRANSFORMERS_NAMES, "hidden_size": "embedding_dim", "add_post_blocks_norm": "add_out_norm"}
# xLSTMLargeConfig (xlstm 2.0.6): required fields and defaults. The kernel choices and modes change how,
# not what, the model computes.
XLSTM_LARGE_REQUIRED = ("embedding_dim", "num_heads", "num_blocks", "vocab_size")
XLSTM_LARGE_DEFAULTS = {
    "use_bias": False, "norm_eps": 1e-6, "norm_reduction_force_float32": True, "add_out_norm": True,
    "qk_dim_factor": 0.5, "v_dim_factor": 1.0, "chunk_size": 64, "eps": 1e-6, "ffn_proj_factor": 2.6667,
    "ffn_round_up_to_multiple_of": 64, "gate_soft_cap": 15.0, "output_logit_soft_cap": 30.0, "weight_mode": "single",
}
XLSTM_LARGE_IGNORED = ("chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "return_last_states",
                       "autocast_kernel_dtype", "inference_state_dtype")


def _norm_float32_note(value, where: str, say) -> None:
    if value is not True:
        say(f"note: {where}: norm_reduction_force_float32={value!r}; xlstm_hf always reduces its norms in float32 "
            "(identical for float32 weights, slightly more precise for 16-bit ones)")


def config_from_transformers(d: dict, say: Callable[[str], None] = logger.info) -> xLSTMConfig:
    """Our config for the `config.json` mapping of a transformers xLSTM checkpoint (model_type "xlstm").

    Absent fields take transformers' defaults (= NX-AI/xLSTM-7b). transformers' model always applies its
    final norm (`backbone.out_norm`, whatever `add_out_norm` says) and never ties its LM head to the
    embedding, so neither does the converted model."""
    from transformers import xLSTMConfig as TransformersXLSTMConfig

    try:
        theirs = TransformersXLSTMConfig.from_dict(dict(d))
    except (StrictDataclassError, ValueError, TypeError) as e:
        raise ValueError(f"config.json: not a valid transformers xLSTMConfig: {e}") from None
    if theirs.embedding_dim != theirs.hidden_size:
        raise ValueError(f"config.json: embedding_dim ({theirs.embedding_dim}) differs from hidden_size "
                         f"({theirs.hidden_size}); transformers would size its embedding and its blocks differently")
    if theirs.num_hidden_layers != theirs.num_blocks:
        raise ValueError(f"config.json: num_blocks ({theirs.num_blocks}) differs from num_hidden_layers "
                         f"({theirs.num_hidden_layers}); transformers builds num_blocks blocks but sizes its cache "
                         f"by num_hidden_layers")
    _norm_float32_note(theirs.norm_reduction_force_float32, "config.json", say)
    if not theirs.add_out_norm:
        say("note: config.json: add_out_norm=false, but transformers' xLSTMModel applies backbone.out_norm anyway; "
            "so does the converted model")
    eos = theirs.eos_token_id
    return _large_config(
        "config.json", TRANSFORMERS_NAMES, hidden=theirs.hidden_size, heads=theirs.num_heads, blocks=theirs.num_blocks,
        vocab=theirs.vocab_size, use_bias=theirs.use_bias, norm_eps=theirs.norm_eps, qk_factor=theirs.qk_dim_factor,
        v_factor=theirs.v_dim_factor, ffn_factor=theirs.ffn_proj_factor, ffn_round=theirs.ffn_round_up_to_multiple_of,
        gate_cap=theirs.gate_soft_cap, logits_cap=theirs.output_logit_soft_cap, eps=theirs.eps,
        chunk_size=theirs.chunk_size, out_norm=True, token_ids=(theirs.bos_token_id, eos, theirs.pad_token_id),
        use_cache=bool(theirs.use_cache),
    )


def config_from_xlstm_large(d: dict, token_ids: tuple = (None, None, None),
                            say: Callable[[str], None] = logger.info) -> xLSTMConfig:
    """Our config for the `config.yaml` mapping of an xlstm_large checkpoint (`xLSTMLargeConfig` fields).

    `token_ids` = (bos, eos, pad), which config.yaml does not hold (see `_special_token_ids`)."""
    known = set(XLSTM_LARGE_REQUIRED) | set(XLSTM_LARGE_DEFAULTS) | set(XLSTM_LARGE_IGNORED)
    for key in d:
        if key not in known:
            raise ValueError(f"config.yaml: {key}: unknown field of xLSTMLargeConfig")
    missing = [key for key in XLSTM_LARGE_REQUIRED if key not in d]
    if missing:
        raise ValueError(f"config.yaml: missing required field(s) {missing} of xLSTMLargeConfig")
    c = {**XLSTM_LARGE_DEFAULTS, **d}
    _norm_float32_note(c["norm_reduction_force_float32"], "config.yaml", say)
    return _large_config(
        "config.yaml", XLSTM_LARGE_NAMES, hidden=c["embedding_dim"], heads=c["num_heads"], blocks=c["num_blocks"],
        vocab=c["vocab_size"], use_bias=c["use_bias"], norm_eps=c["norm_eps"], qk_factor=c["qk_dim_factor"],
        v_factor=c["v_dim_factor"], ffn_factor=c["ffn_proj_factor"], ffn_round=c["ffn_round_up_to_multiple_of"],
        gate_cap=c["gate_soft_cap"], logits_cap=c["output_logit_soft_cap"], eps=c["eps"], chunk_size=c["chunk_size"],
        out_norm=bool(c["add_out_norm"]), token_ids=token_ids,
    )


def transformers_config_from_ours(config: xLSTMConfig, weight_mode: str = "single",
                                  say: Callable[[str], None] = logger.info):
    """transformers' `xLSTMConfig` computing what our large-design `config` computes.

    Raises ValueError for what transformers' model cannot express: the paper design, no final norm,
    widths it computes differently, biases only in the feed-forward or only in the mLSTM layer, a
    non-SwiGLU feed-forward, absent soft caps."""
    from transformers import xLSTMConfig as TransformersXLSTMConfig

    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    if config.block_design != "large":
        raise ValueError(f"only block_design='large' (xLSTM-7B's mLSTM-only design) exports to transformers' xLSTM; "
                         f"this is a paper-design {config.layout} model (transformers has no paper mLSTM/sLSTM blocks)")
    H = config.hidden_size
    problems = []
    if not config.add_post_blocks_norm:
        problems.append("add_post_blocks_norm=False (transformers' xLSTMModel always applies its final norm)")
    if config.ffn_act_fn != "swish":
        problems.append(f"ffn_act_fn={config.ffn_act_fn!r} (transformers' feed-forward is SwiGLU: 'swish')")
    if config.use_bias != config.ffn_use_bias:
        problems.append(f"use_bias={config.use_bias} but ffn_use_bias={config.ffn_use_bias} (one flag in transformers)")
    for name in ("gate_soft_cap", "logits_soft_cap"):
        if getattr(config, name) is None:
            problems.append(f"{name}=None (transformers' xLSTMConfig needs a number)")
    widths = their_widths(H, config.qk_dim_factor, config.v_dim_factor, config.ffn_proj_factor, config.ffn_round_up_to)
    for name, ours, theirs, factor in zip(("q/k", "v"), (config.mlstm_qk_dim, config.mlstm_v_dim), widths,
                                          (config.qk_dim_factor, config.v_dim_factor)):
        if ours != theirs:
            problems.append(f"the {name} width is {ours}, transformers would use int({H} * {factor}) = {theirs}")
    if config.ffn_dim != widths[2]:
        problems.append(f"the feed-forward width is {config.ffn_dim}, transformers would use {widths[2]}")
    if problems:
        raise ValueError("not expressible as a transformers xLSTM: " + "; ".join(problems))
    theirs = TransformersXLSTMConfig(
        vocab_size=config.vocab_size, hidden_size=H, embedding_dim=H, num_hidden_layers=config.num_blocks,
        num_blocks=config.num_blocks, num_heads=config.mlstm_num_heads, use_bias=config.use_bias,
        norm_reduction_force_float32=True, tie_word_embeddings=False, add_out_norm=True, norm_eps=config.norm_eps,
        qk_dim_factor=config.qk_dim_factor, v_dim_factor=config.v_dim_factor, chunk_size=config.chunk_size,
        eps=config.mlstm_eps, ffn_proj_factor=config.ffn_proj_factor, ffn_round_up_to_multiple_of=config.ffn_round_up_to,
        gate_soft_cap=config.gate_soft_cap, output_logit_soft_cap=config.logits_soft_cap, weight_mode=weight_mode,
        use_cache=config.use_cache, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    if (theirs.qk_dim, theirs.v_dim) != (config.mlstm_qk_dim, config.mlstm_v_dim):
        say(f"note: transformers' xLSTMCache sizes its state by widths rounded up to 64 ({theirs.qk_dim}, "
            f"{theirs.v_dim}) while its layers use {config.mlstm_qk_dim}, {config.mlstm_v_dim}: generate() with a "
            "cache fails in transformers for this model (forward without a cache works)")
    return theirs


# --------------------------------------------------------------------------------------------------
# Weight layouts: which rows of which source tensor make which rows of which of ours
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """Rows `ours_rows` of our tensor `ours` are rows `theirs_rows` of their tensor `theirs` (None = all)."""

    ours: str
    ours_rows: tuple[int, int] | None
    theirs: str
    theirs_rows: tuple[int, int] | None


# our name within a block -> theirs within a block, where it is a plain rename in both weight modes
_BLOCK_RENAMES = {
    "norm": "norm_mlstm",
    "ffn_norm": "norm_ffn",
    "mlstm.out_norm": "mlstm_layer.multihead_norm",
    "mlstm.down_proj": "mlstm_layer.out_proj",
    "ffn.down_proj": "ffn.proj_down",
}
_SINGLE_RENAMES = {
    "mlstm.q_proj": "mlstm_layer.q", "mlstm.k_proj": "mlstm_layer.k", "mlstm.v_proj": "mlstm_layer.v",
    "mlstm.ogate": "mlstm_layer.ogate_preact", "mlstm.igate": "mlstm_layer.igate_preact",
    "mlstm.fgate": "mlstm_layer.fgate_preact",
}
_FUSED_GROUPS = {  # fused tensor -> our modules stacked in it, in row order
    "mlstm_layer.qkv_opreact": ("mlstm.q_proj", "mlstm.k_proj", "mlstm.v_proj", "mlstm.ogate"),
    "mlstm_layer.ifgate_preact": ("mlstm.igate", "mlstm.fgate"),
}
_BLOCK = re.compile(r"backbone\.blocks\.(\d+)\.(.+)\.(weight|bias)")


def our_shapes(config: xLSTMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of our model (the tied `lm_head.weight` included), without allocating."""
    with torch.device("meta"):
        model = xLSTMForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def weight_links(config: xLSTMConfig, source: str, weight_mode: str) -> list[Link]:
    """How every tensor of our model relates to the tensors of a `source` ("transformers" or "xlstm_large")
    checkpoint in `weight_mode`. Our `lm_head.weight` is linked to their `lm_head.weight` (never tied there)."""
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    shapes = our_shapes(config)
    F = config.ffn_dim
    top = {
        "backbone.embeddings.weight": "embedding.weight" if source == "xlstm_large" else "backbone.embeddings.weight",
        "backbone.final_norm.weight": "backbone.out_norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    fused_rows = {}  # our module -> (fused tensor, row range)
    for fused, members in _FUSED_GROUPS.items():
        start = 0
        for member in members:
            rows = shapes[f"backbone.blocks.0.{member}.weight"][0]
            fused_rows[member] = (fused, (start, start + rows))
            start += rows
    links = []
    for name in shapes:
        if name in top:
            links.append(Link(name, None, top[name], None))
            continue
        match = _BLOCK.fullmatch(name)
        if match is None:
            raise ValueError(f"{name}: no counterpart in {source} checkpoints")  # a new parameter of ours
        j, module, kind = match.groups()
        theirs = f"backbone.blocks.{j}."
        if module in _BLOCK_RENAMES:
            links.append(Link(name, None, f"{theirs}{_BLOCK_RENAMES[module]}.{kind}", None))
        elif module == "ffn.up_proj":  # [gate | up]
            if weight_mode == "single":
                links.append(Link(name, (0, F), f"{theirs}ffn.proj_up_gate.{kind}", None))
                links.append(Link(name, (F, 2 * F), f"{theirs}ffn.proj_up.{kind}", None))
            else:
                links.append(Link(name, None, f"{theirs}ffn.proj_up_gate_z.{kind}", None))
        elif weight_mode == "single" and module in _SINGLE_RENAMES:
            links.append(Link(name, None, f"{theirs}{_SINGLE_RENAMES[module]}.{kind}", None))
        elif weight_mode == "fused" and module in fused_rows:
            fused, rows = fused_rows[module]
            links.append(Link(name, None, f"{theirs}{fused}.{kind}", rows))
        else:
            raise ValueError(f"{name}: no counterpart in {source} checkpoints")
    return links


# --------------------------------------------------------------------------------------------------
# Reading safetensors folders
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    file: int  # index into SafetensorsFolder.files
    dtype: torch.dtype
    shape: tuple[int, ...]


def _unreadable(path: Path, error: Exception) -> ValueError:
    """The error for a weights file that cannot be read (truncated, corrupt, not a weights file at all)."""
    lines = str(error).strip().splitlines()
    return ValueError(f"{path}: not a readable {'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} "
                      f"file ({type(error).__name__}: {lines[0] if lines else 'no details'})")


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype code, shape) of the tensors in a safetensors file, from its header alone (safetensors
    also checks there that the data the header describes is all in the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file `path`; a file that is not readable raises ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


class SafetensorsFolder:
    """The tensors of a checkpoint spread over safetensors files: name -> (file, dtype, shape), read from
    the files' headers only."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.tensors: dict[str, TensorInfo] = {}
        for index, path in enumerate(self.files):
            for name, (code, shape) in _read_header(path).items():
                if code not in _DTYPE_CODES:
                    raise ValueError(f"{path.name}: {name} has dtype {code}, which is not supported")
                if name in self.tensors:
                    raise ValueError(f"{name} is stored twice: in {self.files[self.tensors[name].file].name} "
                                     f"and in {path.name}")
                self.tensors[name] = TensorInfo(index, _DTYPE_CODES[code], shape)

    @property
    def largest_file_size(self) -> int:
        return max(path.stat().st_size for path in self.files)

    @property
    def where(self) -> str:
        """The weights file, or the folder and its number of weight files (for messages)."""
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.files[0].parent} ({len(self.files)} weight files)"


def transformers_weight_files(src: Path) -> list[Path]:
    """`model.safetensors`, or the shards named in `model.safetensors.index.json` (which must all exist)."""
    index_path = src / SAFE_INDEX_NAME
    if index_path.is_file():
        weight_map = _read_mapping(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no weight_map")
        names = sorted(set(weight_map.values()))  # model-00001-of-0000N first
        missing = [name for name in names if not (src / name).is_file()]
        if missing:
            raise ValueError(f"{index_path} names shard(s) {missing} that are missing from {src}")
        return [src / name for name in names]
    if (src / SAFE_WEIGHTS_NAME).is_file():
        return [src / SAFE_WEIGHTS_NAME]
    found = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    raise ValueError(f"{src}: no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} (found weight files {found or 'none'}; "
                     "only safetensors checkpoints are converted)")


def _check_index_agrees(src: Path, weights: SafetensorsFolder) -> None:
    index_path = src / SAFE_INDEX_NAME
    if not index_path.is_file():
        return
    for name, file in _read_mapping(index_path)["weight_map"].items():
        info = weights.tensors.get(name)
        if info is None or weights.files[info.file].name != file:
            where = "no shard" if info is None else weights.files[info.file].name
            raise ValueError(f"{index_path}: maps {name} to {file}, but it is in {where}")


def xlstm_large_weight_files(src: Path) -> list[Path]:
    """`model.safetensors`, or `model_0.safetensors`, `model_1.safetensors`, ... without gaps."""
    if (src / SAFE_WEIGHTS_NAME).is_file():
        return [src / SAFE_WEIGHTS_NAME]
    numbered = {}
    for path in src.iterdir():
        match = re.fullmatch(r"model_(\d+)\.safetensors", path.name)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        raise ValueError(f"{src}: no {SAFE_WEIGHTS_NAME} and no shards model_0.safetensors, model_1.safetensors, ...")
    gaps = [f"model_{n}.safetensors" for n in range(max(numbered) + 1) if n not in numbered]
    if gaps:
        raise ValueError(f"{src}: shard(s) {gaps} missing from model_0.safetensors .. model_{max(numbered)}.safetensors "
                         f"(found {[numbered[n].name for n in sorted(numbered)]})")
    return [numbered[n] for n in sorted(numbered)]


def our_weight_files(src: Path) -> list[Path]:
    """Files of a checkpoint written by `save_pretrained` (same layout as transformers')."""
    return transformers_weight_files(src)


def _special_token_ids(src: Path, say, vocab_size) -> tuple:
    """(bos, eos, pad) ids of the tokenizer stored in `src`, or Nones when there is none (or it does not load).
    Ids outside the model's vocabulary (`vocab_size`) mean that it is another model's tokenizer: ValueError."""
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        say("note: no tokenizer in the source folder; bos/eos/pad token ids are left unset")
        return None, None, None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # a tokenizer that does not load must not stop the conversion of the weights
        first_line = str(e).splitlines()[0] if str(e) else ""
        say(f"note: the tokenizer in {src} does not load ({type(e).__name__}: {first_line}); bos/eos/pad token ids "
            "are left unset")
        return None, None, None
    ids = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    outside = [f"{name} {i}" for name, i in zip(("bos", "eos", "pad"), ids)
               if i is not None and isinstance(vocab_size, int) and not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"{src}: the tokenizer stored there has {', '.join(outside)} outside the model's vocabulary "
                         f"(vocab_size {vocab_size}); it is another model's tokenizer")
    return ids


# --------------------------------------------------------------------------------------------------
# The streaming converter
# --------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """An output tensor: the row-wise concatenation of `parts` = [(source name, row range or None)]."""

    name: str
    parts: list[tuple[str, tuple[int, int] | None]]
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None  # set when planning


def _targets(links: list[Link], to: str, shapes: dict[str, tuple[int, ...]]) -> list[Target]:
    """Output tensors on side `to` ("ours" or "theirs") with their parts on the other side, in link order.
    `shapes` are the shapes on the output side."""
    grouped: dict[str, list[Link]] = {}
    for link in links:
        grouped.setdefault(link.ours if to == "ours" else link.theirs, []).append(link)
    targets = []
    for name, group in grouped.items():
        def start(link):
            rows = link.ours_rows if to == "ours" else link.theirs_rows
            return rows[0] if rows is not None else 0
        group = sorted(group, key=start)
        parts = [(link.theirs, link.theirs_rows) if to == "ours" else (link.ours, link.ours_rows) for link in group]
        targets.append(Target(name, parts, shapes[name]))
    return targets


def _their_shapes(links: list[Link], ours: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of their tensors implied by the links and our shapes."""
    rows: dict[str, int] = {}
    trailing: dict[str, tuple[int, ...]] = {}
    for link in links:
        shape = ours[link.ours]
        n = (link.ours_rows[1] - link.ours_rows[0]) if link.ours_rows is not None else shape[0]
        if link.theirs_rows is not None:
            rows[link.theirs] = max(rows.get(link.theirs, 0), link.theirs_rows[1])
        else:
            rows[link.theirs] = n
        trailing[link.theirs] = shape[1:]
    return {name: (rows[name],) + trailing[name] for name in rows}


def _check_source(weights: SafetensorsFolder, expected: dict[str, tuple[int, ...]], what: str,
                  droppable: set[str] = frozenset()) -> None:
    """Every expected tensor present with its shape, nothing else (but `droppable`); else one ValueError
    naming the weight file(s) and the missing, unexpected and mis-shaped tensors."""
    def file_of(name):  # for sharded checkpoints: which file holds a mis-shaped tensor
        return f" in {weights.files[weights.tensors[name].file].name}" if len(weights.files) > 1 else ""

    missing = [name for name in expected if name not in weights.tensors]
    unexpected = [name for name in weights.tensors if name not in expected and name not in droppable]
    misshaped = [f"{name} {weights.tensors[name].shape} (expected {expected[name]}){file_of(name)}"
                 for name in expected if name in weights.tensors and weights.tensors[name].shape != expected[name]]
    if missing or unexpected or misshaped:
        def listing(label, items):
            return f"{label} {items[:6]}" + (f" and {len(items) - 6} more" if len(items) > 6 else "")
        problems = [listing(label, items) for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
        raise ValueError(f"{weights.where}: the weights do not match the config ({what}): " + "; ".join(problems))


def parse_size(size: int | str) -> int:
    """Bytes of `size`: an int, or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size: {size!r} is not a size such as 5GB or 500MB")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(match.group(1)) * base**power)


def _nbytes(target: Target) -> int:
    return math.prod(target.shape) * target.dtype.itemsize


class _ShardWriter:
    """Writes one safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is known in
    advance, so nothing but the tensor being written is held in memory."""

    def __init__(self, path: Path, targets: list[Target]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for target in targets:
            size = _nbytes(target)
            header[target.name] = {"dtype": _CODES_OF_DTYPES[target.dtype], "shape": list(target.shape),
                                   "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path, self.expected = path, [t.name for t in targets]
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.written = 0

    def write(self, target: Target, tensor: torch.Tensor) -> None:
        assert target.name == self.expected[self.written], (target.name, self.expected[self.written])
        assert tensor.dtype == target.dtype and tuple(tensor.shape) == target.shape, (target.name, tensor.shape)
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.written += 1

    def close(self) -> None:
        self.file.close()
        if self.written != len(self.expected):
            raise RuntimeError(f"{self.path}: wrote {self.written} of {len(self.expected)} tensors")


def _remove_old_weights(out_dir: Path) -> None:
    for path in out_dir.iterdir():
        shard = re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", path.name)
        if path.name in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) or shard:
            path.unlink()


@contextmanager
def staged_output(out_dir: Path):
    """A new folder next to `out_dir` (on the same filesystem, so that moving out of it is renaming) for a
    conversion to write into. When the block succeeds, `out_dir`'s old weight files (shards and index
    included) go and the new files take their place, replacing files of the same names; other files of
    `out_dir` stay. When it fails, the folder is deleted and `out_dir` is left as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        out_dir.mkdir(exist_ok=True)
        _remove_old_weights(out_dir)
        for path in staging.iterdir():
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stream_convert(weights: SafetensorsFolder, targets: list[Target], out_dir: Path, dtype: torch.dtype | None,
                   max_shard_size: int | str | None, total_parameters: int, progress_bar: bool = True,
                   description: str = "converting") -> dict:
    """Write `targets` (assembled from `weights`) into `out_dir` as `model.safetensors`, or as
    `model-0000i-of-0000N.safetensors` shards of at most `max_shard_size` bytes (a larger tensor gets its own
    shard; None = the largest source file) plus `model.safetensors.index.json`, planned as `save_pretrained`
    plans them. Reads one source file at a time; returns the weight map."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    for target in targets:
        part_dtypes = [weights.tensors[name].dtype for name, _ in target.parts]
        target.dtype = dtype or part_dtypes[0]
        for other in part_dtypes[1:]:
            if dtype is None and other != target.dtype:
                target.dtype = torch.promote_types(target.dtype, other)
    # a target is complete once the last file holding one of its parts has been read
    done_at = {t.name: max(weights.tensors[name].file for name, _ in t.parts) for t in targets}
    order = sorted(targets, key=lambda t: done_at[t.name])  # stable: keeps the model order within a file

    limit = parse_size(max_shard_size) if max_shard_size is not None else weights.largest_file_size
    # the shard plan (file names, greedy filling in writing order) from meta tensors: nothing is allocated
    plan = split_torch_state_dict_into_shards(
        {t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in order}, max_shard_size=limit)
    by_name = {t.name: t for t in order}
    # a tensor larger than the limit gets a shard of its own while the current shard goes on filling, so a
    # shard's file stays open (header written) until its last tensor is in
    writers: dict[str, _ShardWriter] = {}

    def write(target: Target, tensor: torch.Tensor) -> None:
        file = plan.tensor_to_filename[target.name]
        if file not in writers:
            writers[file] = _ShardWriter(out_dir / file, [by_name[name] for name in plan.filename_to_tensors[file]])
        writers[file].write(target, tensor)
        if writers[file].written == len(writers[file].expected):
            writers.pop(file).close()

    out_dir.mkdir(parents=True, exist_ok=True)
    total = plan.metadata["total_size"]
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=not progress_bar)
    pending: dict[tuple[str, int], torch.Tensor] = {}  # (target, part index) -> rows read from an earlier file
    position = 0
    try:
        for file_index, path in enumerate(weights.files):
            with safe_open(str(path), framework="pt") as f:
                def read(name, rows):
                    return f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]

                # parts of tensors that are completed by a later file wait in memory
                for target in order[position:]:
                    if done_at[target.name] == file_index:
                        continue
                    for k, (name, rows) in enumerate(target.parts):
                        if weights.tensors[name].file == file_index:
                            pending[target.name, k] = read(name, rows)
                while position < len(order) and done_at[order[position].name] == file_index:
                    target = order[position]
                    pieces = [pending.pop((target.name, k)) if weights.tensors[name].file != file_index
                              else read(name, rows) for k, (name, rows) in enumerate(target.parts)]
                    tensor = (torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0]).to(target.dtype)
                    del pieces
                    write(target, tensor)
                    bar.update(_nbytes(target))
                    del tensor
                    position += 1
    finally:
        for writer in writers.values():  # only after a failure
            writer.file.close()
        bar.close()
    assert position == len(order) and not pending and not writers
    weight_map = {t.name: plan.tensor_to_filename[t.name] for t in targets}
    if plan.is_sharded:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(out_dir / SAFE_INDEX_NAME, "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype: {dtype!r} is not a torch floating-point dtype (e.g. 'bfloat16')")
    return value


def check_arguments(src: Path, out_dir: Path, dtype, max_shard_size=None) -> None:
    """Everything that can be checked before reading the checkpoint (for every converter)."""
    _as_dtype(dtype)
    if max_shard_size is not None and parse_size(max_shard_size) < 1:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    if not src.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {src}")
    if out_dir.exists() and out_dir.resolve() == src.resolve():
        raise ValueError(f"the output folder {out_dir} is the source folder; choose another one")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output path {out_dir} exists and is not a folder")


def _copy_tokenizer(src: Path, out_dir: Path, say) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out_dir / name)
            copied.append(name)
    if copied:
        say(f"copied the tokenizer files {copied}")
    return copied


def _save_model_files(config: xLSTMConfig, out_dir: Path, dtype: torch.dtype) -> xLSTMForCausalLM:
    """Everything our `save_pretrained` writes except the weights (config.json with auto_map, generation
    config, model code, model card), from a model built on the meta device (nothing is allocated)."""
    from .official import _no_progress_bars

    with torch.device("meta"):
        model = xLSTMForCausalLM(config)
    model = model.to(dtype).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(out_dir, state_dict={})  # an empty state dict writes no weights file
    return model


def _weight_mode_of(weights: SafetensorsFolder) -> str:
    fused = any(".qkv_opreact." in name or ".ifgate_preact." in name for name in weights.tensors)
    return "fused" if fused else "single"


def _convert_large(src: Path, out_dir: Path, source: str, config: xLSTMConfig, weights: SafetensorsFolder,
                   weight_mode: str, dtype, max_shard_size, say, progress_bar) -> Path:
    dtype = _as_dtype(dtype)
    links = weight_links(config, source, weight_mode)
    ours = our_shapes(config)
    expected = _their_shapes(links, ours)
    droppable = set()
    if source == "xlstm_large" and config.use_bias and config.add_post_blocks_norm:
        # xlstm_large's final RMSNorm has a bias when use_bias; ours has none (nor has transformers'): it
        # converts only when it is zero, i.e. when dropping it changes nothing
        name = "backbone.out_norm.bias"
        info = weights.tensors.get(name)
        if info is not None:
            from safetensors import safe_open

            with safe_open(str(weights.files[info.file]), framework="pt") as f:
                bias = f.get_tensor(name)
            if bias.count_nonzero():
                raise ValueError(f"{name}: the final norm of this xlstm_large model has a non-zero bias "
                                 "(use_bias=True), which xlstm_hf's final norm does not have; it cannot be converted "
                                 "exactly")
            say(f"note: dropped {name} (all zeros; xlstm_hf's final norm has no bias)")
            droppable.add(name)
    _check_source(weights, expected, f"{source}, weight_mode {weight_mode!r}", droppable)
    targets = _targets(links, "ours", ours)
    out_dtype = dtype or weights.tensors[targets[0].parts[0][0]].dtype
    with staged_output(out_dir) as staging:
        model = _save_model_files(config, staging, out_dtype)
        stream_convert(weights, targets, staging, dtype, max_shard_size, model.num_parameters(), progress_bar)
        say(f"wrote {len(targets)} tensors ({out_dtype}) to {out_dir}")
        _copy_tokenizer(src, staging, say)
    return out_dir


def convert_transformers_checkpoint(src: str | Path, out_dir: str | Path, dtype=None,
                                    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
                                    progress: Callable[[str], None] | None = None, progress_bar: bool = True) -> Path:
    """Convert a transformers xLSTM folder (model_type "xlstm", e.g. NX-AI/xLSTM-7b) into an xlstm_hf folder.

    `dtype` (a torch dtype or its name) casts the weights; by default each keeps its dtype. Output shards
    hold at most `max_shard_size` (None: the size of the largest source shard). Tokenizer files are copied.
    """
    say = progress or logger.info
    src, out_dir = Path(src), Path(out_dir)
    check_arguments(src, out_dir, dtype, max_shard_size)
    d = _read_mapping(src / "config.json")
    if d.get("model_type") != "xlstm":
        raise ValueError(f"{src / 'config.json'}: model_type {d.get('model_type')!r}, expected 'xlstm'")
    config = config_from_transformers(d, say)
    weights = SafetensorsFolder(transformers_weight_files(src))
    _check_index_agrees(src, weights)
    mode = _weight_mode_of(weights)
    declared = d.get("weight_mode", "single")
    if mode != declared:
        raise ValueError(f"the weights do not match the config: config.json says weight_mode {declared!r}, the "
                         f"weights are {mode!r} (transformers could not load them)")
    say(f"transformers xLSTM: {config.num_blocks} blocks, hidden {config.hidden_size}, {config.mlstm_num_heads} heads, "
        f"vocab {config.vocab_size}, weight_mode {mode}, {len(weights.files)} shard(s)")
    return _convert_large(src, out_dir, "transformers", config, weights, mode, dtype, max_shard_size, say, progress_bar)


def convert_xlstm_large_checkpoint(src: str | Path, out_dir: str | Path, dtype=None,
                                   max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
                                   progress: Callable[[str], None] | None = None, progress_bar: bool = True) -> Path:
    """Convert an NX-AI xlstm_large folder (config.yaml + model.safetensors or model_0.safetensors, ...) into
    an xlstm_hf folder. The bos/eos/pad token ids come from a tokenizer stored in the folder, if any."""
    say = progress or logger.info
    src, out_dir = Path(src), Path(out_dir)
    check_arguments(src, out_dir, dtype, max_shard_size)
    if not (src / "config.yaml").is_file():
        raise ValueError(f"no config.yaml in {src}")
    d = _read_mapping(src / "config.yaml")
    weights = SafetensorsFolder(xlstm_large_weight_files(src))  # before the tokenizer: cheap checks first
    config = config_from_xlstm_large(d, _special_token_ids(src, say, d.get("vocab_size")), say)
    mode = _weight_mode_of(weights)  # the official loader always builds "single"; fused files convert too
    say(f"xlstm_large: {config.num_blocks} blocks, hidden {config.hidden_size}, {config.mlstm_num_heads} heads, "
        f"vocab {config.vocab_size}, weight_mode {mode}, {len(weights.files)} shard(s)")
    return _convert_large(src, out_dir, "xlstm_large", config, weights, mode, dtype, max_shard_size, say, progress_bar)


def _already_xlstm_hf_message(src: str | Path) -> str:
    """What to say when asked to convert one of our own checkpoints: only the large design exports."""
    src = Path(src)
    design = _read_mapping(src / "config.json").get("block_design", "paper")
    message = f"{src} is already an xlstm_hf checkpoint (model_type '{xLSTMConfig.model_type}', block_design {design!r})"
    if design == "large":
        return (f"{message}; export it to transformers' xLSTM format with export_to_transformers / "
                f"`xlstm-hf convert {src} OUT --to transformers`")
    return (f"{message}: load it with AutoModelForCausalLM.from_pretrained after `import xlstm_hf`; only the large "
            "(xLSTM-7B) design exports to transformers' xLSTM, which has no paper mLSTM/sLSTM blocks")


def convert_checkpoint(src: str | Path, out_dir: str | Path, dtype=None,
                       max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
                       progress: Callable[[str], None] | None = None, progress_bar: bool = True,
                       tokenizer: str | None = "auto") -> Path:
    """Convert the checkpoint folder `src` of any supported format (see `detect_format`) into an xlstm_hf
    folder `out_dir`. Official `xlstm` checkpoints go to `conversion.official` (which loads them whole);
    `tokenizer` applies to them (see `convert_official_checkpoint`), the other formats copy the tokenizer
    files of the source folder."""
    fmt = detect_format(src)
    if fmt == "official":
        from .official import convert_official_checkpoint

        return convert_official_checkpoint(src, out_dir, _as_dtype(dtype), progress=progress, tokenizer=tokenizer)
    if tokenizer != "auto":
        raise ValueError(f"tokenizer={tokenizer!r} applies to official xlstm checkpoints only; {src} is a {fmt} "
                         "checkpoint, whose tokenizer files (if any) are copied")
    if fmt == "transformers":
        return convert_transformers_checkpoint(src, out_dir, dtype, max_shard_size, progress, progress_bar)
    if fmt == "xlstm_large":
        return convert_xlstm_large_checkpoint(src, out_dir, dtype, max_shard_size, progress, progress_bar)
    raise ValueError(_already_xlstm_hf_message(src))


def export_to_transformers(src: str | Path, out_dir: str | Path, weight_mode: str = "single", dtype=None,
                           max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
                           progress: Callable[[str], None] | None = None, progress_bar: bool = True) -> Path:
    """Write our large-design checkpoint folder `src` as a transformers xLSTM folder (model_type "xlstm":
    config.json, generation_config.json, safetensors weights in `weight_mode` "single" or "fused", and the
    tokenizer files). Lossless: converting the result back gives the same tensors. A tied LM head is written
    out as a copy of the embedding (transformers' xLSTM never ties)."""
    from transformers import GenerationConfig

    say = progress or logger.info
    src, out_dir = Path(src), Path(out_dir)
    check_arguments(src, out_dir, dtype, max_shard_size)
    fmt = detect_format(src)
    if fmt != "xlstm_hf":
        raise ValueError(f"{src} is a {fmt} checkpoint; export_to_transformers reads xlstm_hf checkpoints "
                         f"(model_type '{xLSTMConfig.model_type}')")
    try:
        config = xLSTMConfig.from_pretrained(str(src))
    except (StrictDataclassError, TypeError) as e:
        raise ValueError(f"{src / 'config.json'}: not a valid xlstm_hf config: {e}") from None
    theirs_config = transformers_config_from_ours(config, weight_mode, say)
    weights = SafetensorsFolder(our_weight_files(src))
    _check_index_agrees(src, weights)
    links = weight_links(config, "transformers", weight_mode)
    shapes = our_shapes(config)
    droppable = set()
    if config.tie_word_embeddings:
        links = [link if link.ours != "lm_head.weight" else Link("backbone.embeddings.weight", None, link.theirs, None)
                 for link in links]
        droppable.add("lm_head.weight")  # present in older saves; the model uses the embedding
    expected = {link.ours: shapes[link.ours] for link in links}
    _check_source(weights, expected, "xlstm_hf large design", droppable)
    targets = _targets(links, "theirs", _their_shapes(links, shapes))
    out_dtype = _as_dtype(dtype) or weights.tensors["backbone.embeddings.weight"].dtype
    theirs_config.architectures = ["xLSTMForCausalLM"]
    theirs_config.dtype = str(out_dtype).removeprefix("torch.")
    with staged_output(out_dir) as staging:
        theirs_config.save_pretrained(staging)
        GenerationConfig.from_model_config(theirs_config).save_pretrained(staging)
        say(f"transformers xLSTM config: weight_mode {weight_mode}, {config.num_blocks} blocks, "
            f"hidden {config.hidden_size}")
        total = sum(math.prod(t.shape) for t in targets)
        stream_convert(weights, targets, staging, _as_dtype(dtype), max_shard_size, total, progress_bar, "exporting")
        say(f"wrote {len(targets)} tensors ({out_dtype}) to {out_dir}")
        _copy_tokenizer(src, staging, say)
    return out_dir


__all__ = [
    "FORMATS",
    "config_from_transformers",
    "config_from_xlstm_large",
    "convert_checkpoint",
    "convert_transformers_checkpoint",
    "convert_xlstm_large_checkpoint",
    "detect_format",
    "export_to_transformers",
    "transformers_config_from_ours",
    "weight_links",
]
