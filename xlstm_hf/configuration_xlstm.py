"""Configuration of the paper's xLSTM language model (Beck et al. 2024, arXiv 2405.04517).

One config describes a residual stack of mLSTM and sLSTM blocks, written xLSTM[a:b] in the paper
(a mLSTM blocks for every b sLSTM blocks). The hyperparameters and their defaults follow the official
`xlstm` package (2.0.6) so that its checkpoints convert one to one; the defaults describe the 125M-class
xLSTM[7:1] model of the paper (768 wide, 24 blocks).
"""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

#: activations of the sLSTM block's gated feed-forward (names as in the official package)
FFN_ACTIVATIONS = ("gelu", "relu", "relu^2", "sigmoid", "swish", "selu")
#: initialisations of the sLSTM forget-gate bias (official names)
SLSTM_BIAS_INITS = ("powerlaw_blockdependent", "small_init", "standard", "zeros")
SLSTM_RECURRENT_INITS = ("zeros", "standard")
MLSTM_MODES = ("chunkwise", "parallel")
#: kernel backends (see backends.py): "auto" = Triton for CUDA tensors when available, else PyTorch
KERNEL_BACKENDS = ("auto", "torch", "triton")


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


@strict
class xLSTMConfig(PreTrainedConfig):
    r"""
    Configuration of [`xLSTMModel`] / [`xLSTMForCausalLM`] (the paper's sLSTM + mLSTM design).

    Args:
        vocab_size: vocabulary size; 50304 is GPT-2's 50257 padded to a multiple of 64, as in the paper.
        hidden_size: residual stream width (the official `embedding_dim`).
        num_blocks: number of residual blocks (also readable as `num_hidden_layers`).
        slstm_at: which blocks are sLSTM blocks, the rest being mLSTM blocks. A list of block indices,
            `"all"`, `[]` (mLSTM only), or the paper's ratio `"a:b"` (e.g. `"7:1"`), which is resolved to
            indices at construction (see `slstm_positions_from_ratio`).
        mlstm_num_heads: heads of the mLSTM cell.
        mlstm_proj_factor: the mLSTM block's up-projection factor (inner width = factor * hidden_size rounded
            up to a multiple of `mlstm_round_up_to`).
        mlstm_round_up_to: rounding multiple of the mLSTM inner width.
        mlstm_conv_kernel_size: causal depthwise conv kernel of the mLSTM block (0 = no conv).
        mlstm_qkv_proj_blocksize: block size of the block-diagonal q/k/v projections.
        slstm_num_heads: heads of the sLSTM cell (head-wise recurrent matrices).
        slstm_conv_kernel_size: causal conv kernel feeding the sLSTM input/forget gates (0 = no conv).
        slstm_bias_init: forget-gate bias init of the sLSTM (`"powerlaw_blockdependent"` is the paper's).
        slstm_recurrent_init: init of the sLSTM recurrent matrices (`"zeros"` as in the official package).
        ffn_proj_factor: up-projection factor of the gated feed-forward after each sLSTM cell.
        ffn_round_up_to: rounding multiple of the feed-forward width.
        ffn_act_fn: activation of the gated feed-forward.
        use_bias: biases in the mLSTM block's projections (official top-level `bias`).
        ffn_use_bias: biases in the sLSTM block's gated feed-forward (official `feedforward.bias`, which
            the official package does not take from the top-level `bias`).
        add_post_blocks_norm: LayerNorm after the last block.
        tie_word_embeddings: share the input embedding with the LM head (official `tie_weights`).
        dropout: dropout after each block's down-projection (and in the sLSTM cell output).
        add_embedding_dropout: also apply `dropout` to the token embeddings.
        norm_eps: epsilon of every LayerNorm / group norm.
        mlstm_eps: epsilon added to the mLSTM normaliser max(|q.n|, exp(-m)).
        chunk_size: chunk length of the chunkwise mLSTM (training and prefill).
        mlstm_mode: `"chunkwise"` (linear memory, default) or `"parallel"` (quadratic; the paper's parallel
            form, used only for inputs without a cache, by the PyTorch backend).
        kernel_backend: `"auto"` (fused Triton kernels for CUDA tensors when Triton is installed, else the
            PyTorch reference), `"torch"` or `"triton"`; the environment variable `XLSTM_KERNEL_BACKEND`
            overrides it.
    """

    model_type = "xlstm_paper"
    attribute_map = {"num_hidden_layers": "num_blocks", "embedding_dim": "hidden_size"}

    vocab_size: int = 50304
    hidden_size: int = 768
    num_blocks: int = 24
    slstm_at: list[int] | str = "7:1"
    mlstm_num_heads: int = 4
    mlstm_proj_factor: float | int = 2.0
    mlstm_round_up_to: int = 64
    mlstm_conv_kernel_size: int = 4
    mlstm_qkv_proj_blocksize: int = 4
    slstm_num_heads: int = 4
    slstm_conv_kernel_size: int = 4
    slstm_bias_init: str = "powerlaw_blockdependent"
    slstm_recurrent_init: str = "zeros"
    ffn_proj_factor: float | int = 1.3
    ffn_round_up_to: int = 64
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
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = 50256

    def __post_init__(self, **kwargs):
        for name in ("mlstm_proj_factor", "ffn_proj_factor", "dropout", "norm_eps", "mlstm_eps"):
            setattr(self, name, float(getattr(self, name)))  # YAML and JSON may write 2.0 as 2
        for name in ("vocab_size", "hidden_size", "num_blocks", "mlstm_num_heads", "slstm_num_heads",
                     "mlstm_round_up_to", "ffn_round_up_to", "mlstm_qkv_proj_blocksize", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
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
        for name in ("mlstm_proj_factor", "ffn_proj_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "mlstm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name, allowed in (("ffn_act_fn", FFN_ACTIVATIONS), ("slstm_bias_init", SLSTM_BIAS_INITS),
                              ("slstm_recurrent_init", SLSTM_RECURRENT_INITS), ("mlstm_mode", MLSTM_MODES),
                              ("kernel_backend", KERNEL_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_mlstm_blocks:
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

    @property
    def block_types(self) -> list[str]:
        """`"s"` or `"m"` for every block, in order."""
        return ["s" if i in self.slstm_at else "m" for i in range(self.num_blocks)]

    @property
    def num_mlstm_blocks(self) -> int:
        return self.num_blocks - len(self.slstm_at)

    @property
    def layout(self) -> str:
        """The paper's notation for the block ratio, e.g. `"xLSTM[7:1]"` (reduced), `"xLSTM[1:0]"` for mLSTM only."""
        m, s = self.num_mlstm_blocks, len(self.slstm_at)
        g = math.gcd(m, s) or 1
        return f"xLSTM[{m // g}:{s // g}]"

    @property
    def mlstm_inner_dim(self) -> int:
        return round_up_dim(self.hidden_size, self.mlstm_proj_factor, self.mlstm_round_up_to)

    @property
    def ffn_dim(self) -> int:
        return round_up_dim(self.hidden_size, self.ffn_proj_factor, self.ffn_round_up_to)


__all__ = ["xLSTMConfig"]
