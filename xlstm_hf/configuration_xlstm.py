"""Configuration of the xLSTM language model (Beck et al. 2024, arXiv 2405.04517).

One config describes a residual stack of xLSTM blocks in one of two designs (`block_design`):
- `"paper"`: the paper's mLSTM and sLSTM blocks, written xLSTM[a:b] (a mLSTM blocks for every b sLSTM
  blocks). Hyperparameters and defaults follow the official `xlstm` package (2.0.6) so that its
  checkpoints convert one to one; the defaults describe the 125M-class xLSTM[7:1] (768 wide, 24 blocks).
- `"large"`: the later mLSTM-only block of NX-AI's xLSTM-7B (`xlstm.xlstm_large`, transformers'
  model_type `xlstm`): pre-RMSNorm residual blocks, q/k at `qk_dim_factor` of the width, soft-capped
  gates, a sigmoid output gate and a SwiGLU feed-forward. `xLSTMConfig.from_preset("xlstm-7b")` gives
  NX-AI/xLSTM-7b's hyperparameters.
"""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: activations of the sLSTM block's gated feed-forward (names as in the official package)
FFN_ACTIVATIONS = ("gelu", "relu", "relu^2", "sigmoid", "swish", "selu")
#: initialisations of the sLSTM forget-gate bias (official names)
SLSTM_BIAS_INITS = ("powerlaw_blockdependent", "small_init", "standard", "zeros")
SLSTM_RECURRENT_INITS = ("zeros", "standard")
MLSTM_MODES = ("chunkwise", "parallel")
BLOCK_DESIGNS = ("paper", "large")
#: kernel backends (see backends.py): "auto" = Triton for CUDA tensors when available, else PyTorch
KERNEL_BACKENDS = ("auto", "torch", "triton")
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
#: GPT-2's <|endoftext|>, its bos, eos and pad token (the default vocabulary is GPT-2's, padded to 50304)
GPT2_EOT_ID = 50256


class _GPT2Default(int):
    """The default of the special-token fields: GPT-2's id 50256, resolved in `__post_init__` to 50256 where
    the vocabulary holds it and to None where it is smaller. A subclass of int so that `__post_init__` can
    tell the default from a 50256 the user passed (which must fit the vocabulary)."""


_EOT_DEFAULT = _GPT2Default(GPT2_EOT_ID)


def round_up_dim(dim: int, factor: float, multiple_of: int) -> int:
    """`factor * dim` rounded up to a multiple of `multiple_of` (the official up-projection rule)."""
    return int(math.ceil(factor * dim / multiple_of) * multiple_of)


def slstm_positions_from_ratio(ratio: str, num_blocks: int) -> list[int]:
    """Block indices of the sLSTM blocks for the paper's xLSTM[a:b] notation.

    `ratio="7:1"` with 24 blocks gives 3 sLSTM blocks; they are spread evenly, each in the middle of its
    group of `num_blocks / count` blocks (24 blocks -> [4, 12, 20]).
    """
    try:
        a, b = (int(part) for part in ratio.split(":"))
    except ValueError:
        raise ValueError(f"slstm_at: '{ratio}' is not of the form 'a:b' (e.g. '7:1'), 'all' or a list of indices")
    if a < 0 or b < 0 or a + b == 0:
        raise ValueError(f"slstm_at: ratio '{ratio}' needs non-negative parts that are not both zero")
    count = round(num_blocks * b / (a + b))
    if b > 0 and count == 0:
        count = 1
    return sorted({int((k + 0.5) * num_blocks / count) for k in range(count)}) if count else []


#: named configurations: `xLSTMConfig.from_preset(name, **overrides)`
PRESETS = {
    # the paper's 125M-class xLSTM[7:1] (the defaults)
    "xlstm-125m": {},
    # NX-AI/xLSTM-7b (config.json of the Hub checkpoint; GPT-NeoX tokenizer ids)
    "xlstm-7b": dict(
        block_design="large", vocab_size=50304, hidden_size=4096, num_blocks=32, slstm_at=[], mlstm_num_heads=8,
        qk_dim_factor=0.5, v_dim_factor=1.0, ffn_proj_factor=2.667, ffn_round_up_to=64, ffn_act_fn="swish",
        gate_soft_cap=15.0, logits_soft_cap=30.0, norm_eps=1e-6, mlstm_eps=1e-6, use_bias=False,
        add_post_blocks_norm=True, tie_word_embeddings=False, chunk_size=64,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
}


@strict
class xLSTMConfig(PreTrainedConfig):
    r"""
    Configuration of [`xLSTMModel`] / [`xLSTMForCausalLM`].

    Args:
        block_design: `"paper"` (mLSTM and sLSTM blocks of the paper) or `"large"` (the mLSTM-only block of
            xLSTM-7B); see the module docstring. Fields marked (paper) or (large) apply to that design only.
        vocab_size: vocabulary size; 50304 is GPT-2's 50257 padded to a multiple of 64, as in the paper.
        hidden_size: residual stream width (the official `embedding_dim`).
        num_blocks: number of residual blocks (also readable as `num_hidden_layers`).
        slstm_at: (paper) which blocks are sLSTM blocks, the rest being mLSTM blocks. A list of block
            indices, `"all"`, `[]` (mLSTM only), or the paper's ratio `"a:b"`, which is resolved to indices at
            construction (see `slstm_positions_from_ratio`). Default: `"7:1"` for the paper design, `[]`
            for the large design (which has no sLSTM block).
        mlstm_num_heads: heads of the mLSTM cell.
        mlstm_proj_factor: (paper) the mLSTM block's up-projection factor (inner width = factor *
            hidden_size rounded up to a multiple of `mlstm_round_up_to`).
        mlstm_round_up_to: rounding multiple of the mLSTM widths (paper: inner width; large: q/k and v widths).
        mlstm_conv_kernel_size: (paper) causal depthwise conv kernel of the mLSTM block (0 = no conv).
        mlstm_qkv_proj_blocksize: (paper) block size of the block-diagonal q/k/v projections.
        qk_dim_factor: (large) width of q and k as a fraction of hidden_size (rounded up to a multiple of
            `mlstm_round_up_to`).
        v_dim_factor: (large) width of v and of the output gate as a fraction of hidden_size (rounded alike).
        mlstm_qk_dim_override, mlstm_v_dim_override: (large) the total q/k and v widths themselves, in place of
            the factor rule above; None (default) = the rule. The converters set them for checkpoints whose
            source computes the width differently (transformers' xLSTM and xlstm_large truncate
            `hidden_size * factor`). Must be divisible by `mlstm_num_heads`.
        gate_soft_cap: (large) soft cap `c * tanh(x / c)` of the input/forget gate pre-activations; None = off.
        logits_soft_cap: soft cap of the output logits; None = off (xLSTM-7B: 30).
        slstm_num_heads: heads of the sLSTM cell (head-wise recurrent matrices).
        slstm_conv_kernel_size: causal conv kernel feeding the sLSTM input/forget gates (0 = no conv).
        slstm_bias_init: forget-gate bias init of the sLSTM (`"powerlaw_blockdependent"` is the paper's).
        slstm_recurrent_init: init of the sLSTM recurrent matrices (`"zeros"` as in the official package).
        ffn_proj_factor: up-projection factor of the gated feed-forward (paper: after each sLSTM cell;
            large: in every block, SwiGLU with `ffn_act_fn="swish"`).
        ffn_round_up_to: rounding multiple of the feed-forward width.
        ffn_dim_override: the feed-forward width itself, in place of `ffn_proj_factor * hidden_size` rounded
            up to a multiple of `ffn_round_up_to`; None (default) = the rule. The converters set it where the
            source rounds differently (transformers' xLSTM and xlstm_large round down when the product lies
            less than 1 above a multiple: 768 * 2.667 = 2048.256 gives 2048 there, 2112 by the rule).
        ffn_act_fn: activation of the gated feed-forward.
        use_bias: biases in the mLSTM block's projections (official top-level `bias`).
        ffn_use_bias: biases in the sLSTM block's gated feed-forward (official `feedforward.bias`, which
            the official package does not take from the top-level `bias`).
        add_post_blocks_norm: norm after the last block (LayerNorm; RMSNorm in the large design).
        tie_word_embeddings: share the input embedding with the LM head (official `tie_weights`).
        dropout: dropout after each block's down-projection (and in the sLSTM cell output).
        add_embedding_dropout: also apply `dropout` to the token embeddings.
        norm_eps: epsilon of every LayerNorm / RMSNorm / group norm.
        mlstm_eps: epsilon added to the mLSTM normaliser max(|q.n|, exp(-m)).
        chunk_size: chunk length of the chunkwise mLSTM (training and prefill).
        mlstm_mode: `"chunkwise"` (linear memory, default) or `"parallel"` (quadratic; the paper's parallel
            form, used only for inputs without a cache, by the PyTorch backend).
        kernel_backend: `"auto"` (fused Triton kernels for CUDA tensors when Triton is installed, else the
            PyTorch reference), `"torch"` or `"triton"`; the environment variable `XLSTM_KERNEL_BACKEND`
            overrides it.
        bos_token_id, eos_token_id, pad_token_id: special token ids (eos may be a list); each must lie in
            [0, vocab_size) or be None. Default: GPT-2's `<|endoftext|>` (50256) when the vocabulary holds it,
            else None.
        compile_inference: run inference's per-token work through `torch.compile`: one-token decode steps
            (fused per-token work, matrix-vector products that stream the weights at memory bandwidth).
            `"auto"`: on CPU for models at least 512 wide (a one-time compile
            of some seconds per process; smaller models are not worth it); True / False force it.
            `XLSTM_COMPILE=0/1` overrides it. Without a working compiler the eager path runs, with a warning.
    """

    model_type = "xlstm_paper"
    attribute_map = {"num_hidden_layers": "num_blocks", "embedding_dim": "hidden_size"}

    block_design: str = "paper"
    vocab_size: int = 50304
    hidden_size: int = 768
    num_blocks: int = 24
    slstm_at: list[int] | str | None = None
    mlstm_num_heads: int = 4
    mlstm_proj_factor: float | int = 2.0
    mlstm_round_up_to: int = 64
    mlstm_conv_kernel_size: int = 4
    mlstm_qkv_proj_blocksize: int = 4
    qk_dim_factor: float | int = 0.5
    v_dim_factor: float | int = 1.0
    mlstm_qk_dim_override: int | None = None
    mlstm_v_dim_override: int | None = None
    gate_soft_cap: float | int | None = None
    logits_soft_cap: float | int | None = None
    slstm_num_heads: int = 4
    slstm_conv_kernel_size: int = 4
    slstm_bias_init: str = "powerlaw_blockdependent"
    slstm_recurrent_init: str = "zeros"
    ffn_proj_factor: float | int = 1.3
    ffn_round_up_to: int = 64
    ffn_dim_override: int | None = None
    ffn_act_fn: str = "gelu"
    use_bias: bool = False
    ffn_use_bias: bool = False
    add_post_blocks_norm: bool = True
    tie_word_embeddings: bool = False
    dropout: float | int = 0.0
    add_embedding_dropout: bool = False
    norm_eps: float | int = 1e-5
    mlstm_eps: float | int = 1e-6
    chunk_size: int = 64
    mlstm_mode: str = "chunkwise"
    kernel_backend: str = "auto"
    compile_inference: bool | str = "auto"
    use_cache: bool = True
    bos_token_id: int | None = _EOT_DEFAULT
    eos_token_id: int | list[int] | None = _EOT_DEFAULT
    pad_token_id: int | None = _EOT_DEFAULT

    def __post_init__(self, **kwargs):
        if self.compile_inference not in (True, False, "auto"):
            raise ValueError(f"compile_inference must be True, False or 'auto', got {self.compile_inference!r}")
        if self.block_design not in BLOCK_DESIGNS:
            raise ValueError(f"block_design must be one of {BLOCK_DESIGNS}, got {self.block_design!r}")
        for name in ("mlstm_proj_factor", "ffn_proj_factor", "dropout", "norm_eps", "mlstm_eps", "qk_dim_factor",
                     "v_dim_factor", "gate_soft_cap", "logits_soft_cap"):
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))  # YAML and JSON may write 2.0 as 2
        for name in ("vocab_size", "hidden_size", "num_blocks", "mlstm_num_heads", "slstm_num_heads",
                     "mlstm_round_up_to", "ffn_round_up_to", "mlstm_qkv_proj_blocksize", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("ffn_dim_override", "mlstm_qk_dim_override", "mlstm_v_dim_override"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer or None (the factor rule), got {getattr(self, name)}")
        if self.block_design == "paper":
            for name in ("mlstm_qk_dim_override", "mlstm_v_dim_override"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to block_design='large' only (the paper design's q, k and v "
                                     f"are all mlstm_inner_dim wide), got {getattr(self, name)}")
        self._resolve_special_token_ids()
        if self.slstm_at is None:
            self.slstm_at = "7:1" if self.block_design == "paper" else []
        if isinstance(self.slstm_at, str):
            if self.slstm_at == "all":
                self.slstm_at = list(range(self.num_blocks))
            else:
                self.slstm_at = slstm_positions_from_ratio(self.slstm_at, self.num_blocks)
        self.slstm_at = sorted(int(i) for i in self.slstm_at)
        if len(set(self.slstm_at)) != len(self.slstm_at) or any(not 0 <= i < self.num_blocks for i in self.slstm_at):
            raise ValueError(f"slstm_at must hold distinct block indices in [0, {self.num_blocks}), got {self.slstm_at}")
        for name in ("mlstm_conv_kernel_size", "slstm_conv_kernel_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no convolution), got {getattr(self, name)}")
        if self.block_design == "large" and self.slstm_at:
            raise ValueError(f"slstm_at must be empty for block_design='large' (mLSTM blocks only), got {self.slstm_at}")
        for name in ("mlstm_proj_factor", "ffn_proj_factor", "qk_dim_factor", "v_dim_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("gate_soft_cap", "logits_soft_cap"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 or None (no cap), got {getattr(self, name)}")
        for name in ("norm_eps", "mlstm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name, allowed in (("ffn_act_fn", FFN_ACTIVATIONS), ("slstm_bias_init", SLSTM_BIAS_INITS),
                              ("slstm_recurrent_init", SLSTM_RECURRENT_INITS), ("mlstm_mode", MLSTM_MODES),
                              ("kernel_backend", KERNEL_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.block_design == "large":
            for name, width in (("q/k", self.mlstm_qk_dim), ("v", self.mlstm_v_dim)):
                if width % self.mlstm_num_heads:
                    raise ValueError(f"mlstm_num_heads ({self.mlstm_num_heads}) must divide the mLSTM {name} width {width}")
        elif self.num_mlstm_blocks:
            inner = self.mlstm_inner_dim
            if inner % self.mlstm_num_heads:
                raise ValueError(f"mlstm_num_heads ({self.mlstm_num_heads}) must divide the mLSTM inner width {inner}")
            if inner % self.mlstm_qkv_proj_blocksize:
                raise ValueError(
                    f"mlstm_qkv_proj_blocksize ({self.mlstm_qkv_proj_blocksize}) must divide the mLSTM inner width {inner}"
                )
        if self.slstm_at:
            if self.hidden_size % self.slstm_num_heads:
                raise ValueError(f"slstm_num_heads ({self.slstm_num_heads}) must divide hidden_size ({self.hidden_size})")
            if self.slstm_bias_init == "powerlaw_blockdependent" and self.hidden_size // self.slstm_num_heads < 2:
                raise ValueError("slstm_bias_init='powerlaw_blockdependent' needs an sLSTM head size of at least 2")
        super().__post_init__(**kwargs)

    def _resolve_special_token_ids(self) -> None:
        """The GPT-2 default becomes 50256 or None (see `_GPT2Default`); an id given outside the vocabulary
        is an error."""
        for name in SPECIAL_TOKEN_FIELDS:
            value = getattr(self, name)
            if isinstance(value, _GPT2Default):
                setattr(self, name, GPT2_EOT_ID if GPT2_EOT_ID < self.vocab_size else None)
                continue
            ids = value if isinstance(value, list) else [value]
            if any(i is not None and not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{name} must be None or a token id in [0, vocab_size={self.vocab_size}), got {value}")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "xLSTMConfig":
        """As `PreTrainedConfig.from_dict`, and loads the config.json of earlier xlstm_hf versions, which
        wrote the GPT-2 default 50256 even for smaller vocabularies: such an id loads as None (with a warning)
        instead of failing the vocabulary check."""
        vocab_size = config_dict.get("vocab_size", cls.vocab_size)
        stale = [name for name in SPECIAL_TOKEN_FIELDS
                 if config_dict.get(name) == GPT2_EOT_ID and isinstance(vocab_size, int) and vocab_size <= GPT2_EOT_ID]
        if stale:
            logger.warning(f"config: {', '.join(stale)} = {GPT2_EOT_ID} outside the vocabulary (vocab_size {vocab_size}): "
                           "GPT-2's <|endoftext|>, which earlier xlstm_hf versions saved by default; loaded as None")
            config_dict = {**config_dict, **dict.fromkeys(stale)}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "xLSTMConfig":
        """A named configuration (see `PRESETS`), e.g. `from_preset("xlstm-7b")`, with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def block_types(self) -> list[str]:
        """`"s"` or `"m"` for every block, in order."""
        return ["s" if i in self.slstm_at else "m" for i in range(self.num_blocks)]

    @property
    def num_mlstm_blocks(self) -> int:
        return self.num_blocks - len(self.slstm_at)

    @property
    def layout(self) -> str:
        """The paper's notation for the block ratio, e.g. `"xLSTM[7:1]"` (reduced), `"xLSTM[1:0]"` for mLSTM
        only; `"xLSTM-large"` for the large design."""
        if self.block_design == "large":
            return "xLSTM-large"
        m, s = self.num_mlstm_blocks, len(self.slstm_at)
        g = math.gcd(m, s) or 1
        return f"xLSTM[{m // g}:{s // g}]"

    @property
    def mlstm_inner_dim(self) -> int:
        """(paper) Width of the mLSTM block's up-projection, and of its q, k and v."""
        return round_up_dim(self.hidden_size, self.mlstm_proj_factor, self.mlstm_round_up_to)

    @property
    def mlstm_qk_dim(self) -> int:
        """Total width of q and k over all mLSTM heads."""
        if self.block_design != "large":
            return self.mlstm_inner_dim
        if self.mlstm_qk_dim_override is not None:
            return self.mlstm_qk_dim_override
        return round_up_dim(self.hidden_size, self.qk_dim_factor, self.mlstm_round_up_to)

    @property
    def mlstm_v_dim(self) -> int:
        """Total width of v (and of the mLSTM cell output) over all mLSTM heads."""
        if self.block_design != "large":
            return self.mlstm_inner_dim
        if self.mlstm_v_dim_override is not None:
            return self.mlstm_v_dim_override
        return round_up_dim(self.hidden_size, self.v_dim_factor, self.mlstm_round_up_to)

    @property
    def ffn_dim(self) -> int:
        """Width of the gated feed-forward (each of its gate and up halves)."""
        if self.ffn_dim_override is not None:
            return self.ffn_dim_override
        return round_up_dim(self.hidden_size, self.ffn_proj_factor, self.ffn_round_up_to)


__all__ = ["GPT2_EOT_ID", "PRESETS", "xLSTMConfig"]
