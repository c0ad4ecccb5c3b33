"""The xLSTM language model (Beck et al. 2024) as a Hugging Face model, from blocks to LM head.

Layout (names of our parameters, which say what each one does):

    xLSTMForCausalLM
      backbone: xLSTMModel
        embeddings                      token embedding
        blocks[j]: mLSTMBlock           x + mLSTMLayer(LayerNorm(x))                        (paper design)
                   sLSTMBlock           x + sLSTMLayer(LayerNorm(x)); x + GatedFeedForward(LayerNorm(x))
                   mLSTMLargeBlock      x + mLSTMLargeLayer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))   (xLSTM-7B)
        final_norm                      LayerNorm (RMSNorm in the large design) after the last block
      lm_head                           tied to `embeddings` when `config.tie_word_embeddings`

The cell recurrences live in `cells.py` (one mLSTM for both designs, called through `run_mlstm_cell`);
this file holds the layers around them, the recurrent-state cache used by `generate()`, and the Hugging
Face plumbing.

Padding: a position whose `attention_mask` is 0 is treated as absent. It enters no recurrent state (the
mLSTM sees input gate -inf and forget gate 1 there, the sLSTM keeps its state), and it enters the causal
convolutions as zeros, which is exactly "absent" for left padding (the padding `generate()` uses).

Packed rows: where a document starts (`document_starts`, from restarting position_ids, seq_idx or
cu_seq_lens), nothing before it is seen: the mLSTM's forget gate is exactly zero there, the sLSTM starts
from the zero state, and the convolutions' taps do not reach back past it (`Documents`).
"""

import json
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, LinearAttentionLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .backends import compile_enabled, decode_call, fused_cpu, get_ops, linear
from .cells import slstm_by_document, slstm_recurrent
from .configuration_xlstm import xLSTMConfig

try:  # model cards and Hub uploads where xlstm_hf is installed; an absolute import, which save_pretrained does
    # not follow (it copies relative imports only), so checkpoints do not carry the Hub tooling
    from xlstm_hf.hub import xLSTMHubMixin
except ImportError:  # remote code without xlstm_hf: transformers' own save_pretrained / push_to_hub

    class xLSTMHubMixin:
        pass


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old name
# still works there, with a deprecation warning). Our forward accepts both; outputs and generate() use the
# name of the installed version.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


#: inputs of padding-free packing (transformers' DataCollatorWithFlattening, flash-attention style kwargs)
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
#: keyword arguments of transformers' causal-LM loss, which Trainer passes through the forward
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def refuse_unsupported_inputs(kwargs: dict) -> None:
    """Raise for inputs the model cannot honour instead of ignoring them: output_attentions and unknown keywords."""
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True: xLSTM has no attention weights to return")
    unknown = sorted(set(kwargs) - set(PACKING_KWARGS) - {"output_attentions", "_resets"})
    if unknown:
        raise TypeError(f"forward() got unexpected keyword arguments {unknown}")


def document_starts(position_ids, kwargs: dict, mask, batch: int, length: int, has_state: bool):
    """Where packed documents start: a (B, T) bool, True at the first token of a document whose state must not
    flow in from before it, or None where there is none.

    Sources, as transformers' packing collators give them (DataCollatorWithFlattening): `cu_seq_lens_q`/`_k`
    (D + 1,) cumulative document lengths of a single row; `seq_idx` (B, T) the document of each token;
    `position_ids` (B, T): a document starts where a real token's position does not continue the previous
    real token's (+1), e.g. restarts at 0. At a row's first real token, a start matters only when a state
    is carried in (`has_state`: a cache that has seen tokens); there it is cu_seq_lens (which always start a
    document at 0), or position 0. Padding (mask False) never starts a document. Eagerly, the sources are
    checked to agree and None is returned when nothing starts (a host sync on accelerators, paid only by
    callers that pass these inputs, as flash-attention's packing pays it); while tracing, the starts are
    returned as they are."""
    sources = {}
    cu = {name: kwargs[name] for name in ("cu_seq_lens_q", "cu_seq_lens_k") if kwargs.get(name) is not None}
    if cu:
        starts = _starts_from_cu_seq_lens(cu, batch, length)
        starts[:, 0] &= has_state  # (the row's first document: a start only where a state is carried in)
        sources["cu_seq_lens"] = starts if mask is None else starts & mask
    if kwargs.get("seq_idx") is not None:
        seq_idx = _check_per_token("seq_idx", kwargs["seq_idx"], batch, length)
        sources["seq_idx"] = _starts_where(lambda now, before: now != before, seq_idx, mask, has_state, None)
    if position_ids is not None:
        position_ids = _check_per_token("position_ids", position_ids, batch, length)
        sources["position_ids"] = _starts_where(lambda now, before: now != before + 1, position_ids, mask,
                                                has_state, position_ids == 0)
    if not sources:
        return None
    (name, starts), *others = sources.items()
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return starts  # (the packed path, which is exact also where nothing starts)
    for other, more in others:
        if not torch.equal(starts, more):
            raise ValueError(f"{name} and {other} describe different packed documents")
    return starts if starts.any() else None


class Documents(NamedTuple):
    """Packed documents in the rows of a forward: `resets` (B, T) bool, True where a document starts (see
    `document_starts`), and `positions` (B, T) long, each token's position in its document (tokens before a
    row's first start continue what came before: a position of 2^30 + t), which the causal convs need."""

    resets: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, resets: torch.Tensor | None) -> "Documents | None":
        if resets is None:
            return None
        index = torch.arange(resets.shape[1], device=resets.device)
        begin = torch.where(resets, index, -(1 << 30)).cummax(-1).values
        return cls(resets, index - begin)


def _check_per_token(name, ids, batch, length):
    if ids.dim() == 1 and batch == 1:
        ids = ids[None]
    if ids.shape != (batch, length) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape ({batch}, {length}), got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    return ids


def _starts_where(differs, ids, mask, has_state, first_starts):
    """Document starts from per-token ids: at real tokens t where `differs(ids_t, ids_p)` for the previous real
    token p in the row; at a row's first real token, where `first_starts` (B, T) says so and a state is carried in."""
    B, T = ids.shape
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    index = torch.arange(T, device=ids.device).expand(B, T)
    # the previous real token of each position: a running max of the real positions, shifted by one
    previous = torch.where(real, index, -1).cummax(-1).values
    previous = torch.cat([previous.new_full((B, 1), -1), previous[:, :-1]], dim=1)
    starts = real & (previous >= 0) & differs(ids, ids.gather(1, previous.clamp_min(0)))
    if has_state and first_starts is not None:
        starts = starts | (real & (previous < 0) & first_starts)
    return starts


def _starts_from_cu_seq_lens(cu: dict, batch: int, length: int):
    """Document starts of one packed row from the collator's cumulative lengths (D + 1,): 0, l_1, l_1 + l_2, ..., T."""
    if len(cu) == 2 and not (cu["cu_seq_lens_q"].shape == cu["cu_seq_lens_k"].shape
                             and torch.equal(cu["cu_seq_lens_q"], cu["cu_seq_lens_k"])):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: a causal LM's queries and keys are the same tokens")
    name, lengths = next(iter(cu.items()))
    if batch != 1:
        raise ValueError(f"{name} describes one packed row (as DataCollatorWithFlattening makes it), got a batch of "
                         f"{batch} rows: pass position_ids or seq_idx for several packed rows")
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.numel() < 2:
        raise ValueError(f"{name} must be a 1-D integer tensor (0, l_1, l_1 + l_2, ..., {length}), got "
                         f"{tuple(lengths.shape)} {lengths.dtype}")
    if reads_values(lengths) and not (lengths[0] == 0 and lengths[-1] == length and (lengths.diff() >= 0).all()):
        raise ValueError(f"{name} must rise from 0 to the row's length {length}, got {lengths.tolist()}")
    starts = torch.zeros(1, length + 1, dtype=torch.bool, device=lengths.device)
    starts[0, lengths[:-1].long()] = True
    return starts[:, :length]


def _one_cache(cache, past_key_values):
    """The cache passed as `cache` or under its old name `past_key_values` (not two different ones)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values

# --------------------------------------------------------------------------------------------------
# Building blocks with the official package's initialisation
# --------------------------------------------------------------------------------------------------


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(x / cap)`: smoothly bounds x to (-cap, cap); identity for cap None (xLSTM-7B's gates, logits)."""
    return x if cap is None else cap * torch.tanh(x / cap)


def small_init_std(dim: int) -> float:
    """"Small init" (Nguyen & Salazar 2019), the official std for input-side projections."""
    return math.sqrt(2 / (5 * dim))


def wang_init_std(dim: int, num_blocks: int) -> float:
    """Wang init, the official std for output-side projections of a residual stack."""
    return 2 / num_blocks / math.sqrt(dim)


class Linear(nn.Linear):
    """nn.Linear initialised with a normal(0, `std`) weight and a zero bias. In a compiled decode step
    it streams its weight for up to `matvec_rows` input rows (see backends.linear)."""

    matvec_rows = 1

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float):
        self.init_std = std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self):
        init.normal_(self.weight, std=self.init_std)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.matvec_rows)  # F.linear, or a streaming loop in compiled decoding


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: the input is split into `num_blocks` groups, each projected on its own.

    weight: (num_blocks, out_per_block, in_per_block). (..., F) -> (..., num_blocks * out_per_block).
    """

    def __init__(self, features: int, num_blocks: int, bias: bool, std: float):
        super().__init__()
        self.num_blocks, self.init_std = num_blocks, std
        block = features // num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, block, block))
        self.bias = nn.Parameter(torch.empty(features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        init.normal_(self.weight, std=self.init_std)
        if self.bias is not None:
            init.zeros_(self.bias)

    #: blocks narrower than this are computed in dense groups of about this many features (see `forward`)
    group_features = 32

    def grouped_weight(self) -> torch.Tensor:
        """The weight as (groups, G, G) matrices, (in, out) for `x @ w`: each group is `G // block` blocks
        side by side on the diagonal, zeros elsewhere. One block per group when blocks are wide."""
        nb, bs = self.weight.shape[:2]
        per = max(1, self.group_features // bs)
        while nb % per:
            per -= 1
        w = self.weight.unflatten(0, (nb // per, per))  # (groups, per, out, in)
        if per == 1:
            return w[:, 0].transpose(-1, -2)
        eye = torch.eye(per, dtype=w.dtype, device=w.device)
        return torch.einsum("gjoi,jk->gjiko", w, eye).flatten(3).flatten(1, 2)  # [g, (j, i), (k, o)]

    #: inputs with fewer rows (decoding) use the per-block product: no grouped weight to build per token
    group_min_rows = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.group_min_rows * x.shape[-1]:
            y = torch.einsum("...hi,hoi->...ho", x.unflatten(-1, (self.num_blocks, -1)), self.weight).flatten(-2)
            return y + self.bias if self.bias is not None else y
        # Narrow blocks (the mLSTM's q, k, v: 4 features each) make a per-block product a batch of tiny
        # matmuls, several times slower than the memory it reads. Grouping blocks into ~32-wide block-diagonal
        # matrices multiplies some zeros (G / block times the FLOPs, still few) in one efficient batched matmul.
        w = self.grouped_weight()
        groups, G = w.shape[0], w.shape[1]
        y = torch.bmm(x.reshape(-1, groups, G).transpose(0, 1), w).transpose(0, 1).reshape(x.shape)
        return y + self.bias if self.bias is not None else y


class LayerNorm(nn.Module):
    """LayerNorm with a weight and an optional bias. The weight is the actual scale (init 1); the official
    package stores `w` and scales by `1 + w`, which conversion accounts for."""

    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RMSNorm(LayerNorm):
    """x / sqrt(mean(x^2) + eps), reduced in float32, times the weight (plus the optional bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.weight
        return y + self.bias if self.bias is not None else y


class MultiHeadLayerNorm(LayerNorm):
    """Group norm over heads: each head's DH features are normalised on their own, then scaled per feature.

    (B, T, NH, DH) -> (B, T, NH * DH).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, NH, DH = x.shape
        # a layer norm over each head's features, then the per-feature scale: the same as F.group_norm
        # with NH groups, which is several times slower on CPU
        y = F.layer_norm(x, (DH,), eps=self.eps).reshape(B, T, NH * DH) * self.weight
        return y + self.bias if self.bias is not None else y


def dense(x: torch.Tensor) -> torch.Tensor:
    """x with row-major strides in every dimension: a view where x is contiguous, else a copy. (Contiguous
    tensors may carry any stride in a dimension of size 1, such as a batch of one, and torch.compile guards
    on strides: the compiled decode step would compile again for a prefill's cache layout.)"""
    stride, dense_strides = 1, []
    for size in reversed(x.shape):
        dense_strides.insert(0, stride)
        stride *= max(size, 1)
    if list(x.stride()) == dense_strides:
        return x
    return x.as_strided(x.shape, dense_strides) if x.is_contiguous() else x.contiguous()


class CausalConv1d(nn.Module):
    """Causal depthwise convolution over time with a carried window of the last `kernel_size - 1` inputs.

    weight: (F, 1, K) as in nn.Conv1d; `forward(x (B, T, F), window (B, K-1, F) or None, positions)` returns
    (y (B, T, F), new window). An absent window means zeros (nothing before the sequence). `positions`
    (B, T), optional: each token's position in its document (packed rows restart at 0): a tap that reaches
    back s steps counts only where the position is >= s, so no document sees another's inputs.
    """

    def __init__(self, features: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(features, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(features))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv1d's default init, which the official package keeps
        bound = 1 / math.sqrt(self.kernel_size)
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, window: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        K, T = self.kernel_size, x.shape[1]
        given = window
        if window is None:
            window = x.new_zeros(x.shape[0], K - 1, x.shape[2])
        window = window.to(x.dtype)
        if T == 1 and positions is None:  # decode: one dot product per feature, no conv launch
            xw = torch.cat([window, x], dim=1)  # (B, K, F)
            return torch.einsum("bkf,fk->bf", xw, self.weight[:, 0, :])[:, None] + self.bias, xw[:, 1:]
        if positions is None and fused_cpu(x, window, self.weight, self.bias):
            # no gradients (prefill) on CPU: the fused kernel, one pass over x and no concatenation
            y = torch.ops.xlstm_hf.causal_conv(x, None if given is None else window, self.weight, self.bias)
        else:
            y = self._shifted_sum(x, None if given is None else window, positions)
        tail = x[:, max(T - (K - 1), 0):]  # the last min(T, K-1) inputs
        window = torch.cat([window, tail], dim=1)[:, tail.shape[1]:]
        if positions is not None:  # packed documents: keep the entries of the last token's document, those
            back = torch.arange(K - 2, -1, -1, device=x.device)  # s steps back where its position is >= s
            window = window * (positions[:, -1:] >= back)[..., None].to(x.dtype)
        return y, window

    def _shifted_sum(self, x: torch.Tensor, window: torch.Tensor | None, positions=None) -> torch.Tensor:
        """y_t = bias + sum_s w_{K-1-s} x_{t-s} (x_{t-s} from the window where t < s, zero without one; with
        `positions`, only the terms with positions_t >= s: those in t's own document).

        K shifted multiply-adds of x itself in the (B, T, F) layout, in place on the output: several times
        faster on CPU than a depthwise F.conv1d (which works channels-first and transposes twice), and
        autograd keeps views of x rather than a copy [window, x]. Summed in float32 (as the conv does
        inside) also for bf16 inputs: K roundings to bf16 would add up."""
        K, T, w = self.kernel_size, x.shape[1], self.weight[:, 0, :]
        y = torch.addcmul(self.bias.to(torch.promote_types(x.dtype, torch.float32)), x, w[:, K - 1])
        for s in range(1, K):
            inside = None if positions is None else (positions >= s)[..., None].to(x.dtype)  # (B, T, 1)
            if s < T:
                term = x[:, :T - s] if inside is None else x[:, :T - s] * inside[:, s:]
                y[:, s:].addcmul_(term, w[:, K - 1 - s])
            if window is not None:  # the first min(s, T) outputs reach back into the window
                n = min(s, T)
                term = window[:, K - 1 - s:K - 1 - s + n]
                y[:, :n].addcmul_(term if inside is None else term * inside[:, :n], w[:, K - 1 - s])
        return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# mLSTM and sLSTM layers
# --------------------------------------------------------------------------------------------------


def reads_values(tensor: torch.Tensor) -> bool:
    """Whether the forward may read `tensor`'s values on the host (for input checks and shortcuts): only in
    eager calls on CPU tensors. While tracing (torch.compile, torch.export, TorchScript) a value read is a
    data-dependent guard, and on an accelerator a host sync in every forward."""
    return tensor.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling `module` or one of its submodules runs more than its `forward`: forward (pre-)hooks,
    a `forward` replaced on the instance (accelerate's device_map / CPU-offload hooks do that), or global
    module hooks."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    def replaced(m):  # accelerate's remove_hook_from_module leaves the class's own forward, bound, behind
        forward = m.__dict__.get("forward")
        return forward is not None and getattr(forward, "__func__", None) is not type(m).forward

    return any(m._forward_hooks or m._forward_pre_hooks or replaced(m) for m in module.modules())


def inference_compiled(module: nn.Module, device: torch.device, called: nn.Module) -> bool:
    """Whether `module` (which has a `config`) runs its per-token work through torch.compile now: only in
    inference (eval mode, no autograd), as `config.compile_inference` says (see backends.compile_enabled),
    and only where `called` (the modules that the compiled path calls by their class's forward) has no hooks,
    which that path would skip."""
    return not (module.training or torch.is_grad_enabled()) and compile_enabled(
        module.config.compile_inference, device, module.config.hidden_size) and not has_forward_hooks(called)


class GateLinear(nn.Linear):
    """A gate pre-activation projection: zero weight, bias initialised as the official packages do it:
    "linspace" (forget gates, linearly spaced in [3, 6], i.e. remember by default), "normal" (the paper's
    input gates, normal(0, 0.1)) or a number (xLSTM-7B's input gates: -10)."""

    def __init__(self, in_features: int, heads: int, bias_init: str | float):
        self.bias_init = bias_init
        super().__init__(in_features, heads, bias=True)

    def reset_parameters(self):
        init.zeros_(self.weight)
        if self.bias_init == "linspace":
            init.copy_(self.bias, torch.linspace(3.0, 6.0, self.out_features))
        elif self.bias_init == "normal":
            init.normal_(self.bias, std=0.1)
        else:
            init.constant_(self.bias, float(self.bias_init))


def run_mlstm_cell(config: xLSTMConfig, q, k, v, i, f, state: dict, mask, output_state: bool, resets=None):
    """The mLSTM cell of both designs, through the configured kernel backend.

    q, k: (B, T, NH * DK); v: (B, T, NH * DV); i, f: (B, T, NH) gate pre-activations; state: {"C", "n", "m"}
    or empty; mask: (B, T) bool or None (a padded step is an identity update: nothing written, nothing
    forgotten); resets: (B, T) bool or None, True where a packed document starts (nothing before it is
    seen: a forget gate of exactly zero). Returns (h (B, T, NH, DV), {"C", "n", "m"} or None). Decoding
    (T = 1 with a state) takes the step form; a whole sequence the configured form (`mlstm_mode`),
    chunkwise when a state is read or written.
    """
    B, T, _ = q.shape
    NH = i.shape[-1]
    if mask is not None:
        i = i.masked_fill(~mask[..., None], float("-inf"))
        f = f.masked_fill(~mask[..., None], float("inf"))
    heads = lambda t: t.view(B, T, NH, -1).transpose(1, 2)  # noqa: E731 (B, NH, T, D)
    q, k, v, i, f = heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2)
    previous = (state["C"], state["n"], state["m"]) if "C" in state else None
    ops = get_ops(config.kernel_backend, q.device)
    if T == 1 and previous is not None:  # decode
        if resets is not None:  # log sigmoid(-inf) = -inf: the step forgets the state exactly
            f = f.masked_fill(resets[:, None], float("-inf"))
        h, cell_state = ops["mlstm_step"](q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], previous, config.mlstm_eps)
        h = h.to(v.dtype)[:, :, None]
    else:
        # the parallel form has no state in or out; with a state to read or write, chunkwise is used
        form = config.mlstm_mode if previous is None and not output_state else "chunkwise"
        h, cell_state = ops[f"mlstm_{form}"](q, k, v, i, f, initial_state=previous, output_final_state=output_state,
                                             eps=config.mlstm_eps, chunk_size=config.chunk_size, resets=resets)
    h = h.transpose(1, 2)
    return h, (dict(zip("Cnm", cell_state)) if output_state else None)


class mLSTMLayer(nn.Module):
    """The mLSTM block's mixer (paper Fig. 11): up-projection into an mLSTM branch and an output-gate branch.

    mLSTM branch: causal conv + SiLU -> block-diagonal q, k; v from the pre-conv branch; input and forget
    gate pre-activations from [q, k, v]; the mLSTM cell; per-head group norm; learnable skip of the conv
    output. The result is gated by SiLU of the second branch and projected down.
    """

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        H, I, NH = config.hidden_size, config.mlstm_inner_dim, config.mlstm_num_heads
        self.config = config  # mlstm_mode, chunk_size and kernel_backend are read per call
        small = small_init_std(H)
        self.up_proj = Linear(H, 2 * I, config.use_bias, small)
        self.conv = CausalConv1d(I, config.mlstm_conv_kernel_size) if config.mlstm_conv_kernel_size else None
        blocks = I // config.mlstm_qkv_proj_blocksize
        self.q_proj = HeadwiseLinear(I, blocks, config.use_bias, small)
        self.k_proj = HeadwiseLinear(I, blocks, config.use_bias, small)
        self.v_proj = HeadwiseLinear(I, blocks, config.use_bias, small)
        self.igate = GateLinear(3 * I, NH, bias_init="normal")
        self.fgate = GateLinear(3 * I, NH, bias_init="linspace")
        self.out_norm = MultiHeadLayerNorm(I, config.norm_eps)  # *_norm: Trainer exempts it from weight decay
        self.learnable_skip = nn.Parameter(torch.empty(I))
        self.down_proj = Linear(I, H, config.use_bias, wang_init_std(H, config.num_blocks))
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        init.ones_(self.learnable_skip)

    def gate_preactivations(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The input and forget gate pre-activations (B, T, NH) each, from [q, k, v] (B, T, 3 I). Both gates'
        weights are split into their q, k and v columns, so that [q, k, v] (a copy of 3 I values per token)
        is never built. Gates replaced by other modules (PEFT's LoRA layers) are called on [q, k, v]."""
        if not (type(self.igate) is GateLinear and type(self.fgate) is GateLinear):
            qkv = torch.cat([q, k, v], dim=-1)
            return self.igate(qkv), self.fgate(qkv)
        weight = torch.cat([self.igate.weight, self.fgate.weight])  # (2 NH, 3 I): small
        wq, wk, wv = weight.split(q.shape[-1], dim=-1)
        bias = torch.cat([self.igate.bias, self.fgate.bias])
        return (linear(q, wq) + linear(k, wk) + linear(v, wv, bias)).chunk(2, dim=-1)

    def forward(self, x: torch.Tensor, state: dict | None = None, mask: torch.Tensor | None = None,
                output_state: bool = False, documents: "Documents | None" = None):
        """x: (B, T, H); state: {"conv", "C", "n", "m"} or None; mask: (B, T) bool or None; documents: where
        packed documents start, or None. Returns (y (B, T, H), new state or None).
        """
        state = state or {}
        resets, positions = documents or (None, None)
        x_mlstm, z = self.up_proj(x).chunk(2, dim=-1)
        conv_in = x_mlstm if mask is None else x_mlstm * mask[..., None].to(x_mlstm.dtype)
        window = None
        if self.conv is not None:
            conv_out, window = self.conv(conv_in, state.get("conv"), positions)
        else:
            conv_out = conv_in
        x_conv = F.silu(conv_out)
        q, k, v = self.q_proj(x_conv), self.k_proj(x_conv), self.v_proj(x_mlstm)
        i, f = self.gate_preactivations(q, k, v)
        h, cell_state = run_mlstm_cell(self.config, q, k, v, i, f, state, mask, output_state, resets)
        if torch.is_grad_enabled():
            # recomputed in the backward from h, x_conv and z, which autograd keeps anyway: its three
            # (B, T, I) intermediates are not kept (~18 kB per token and block in float32), for a few
            # elementwise passes (~1% of a training step)
            gated = checkpoint(self.gated_output, h, x_conv, z, use_reentrant=False)
        else:
            gated = self.gated_output(h, x_conv, z)
        y = self.dropout(self.down_proj(gated))
        return y, ({"conv": window, **cell_state} if output_state else None)

    def gated_output(self, h: torch.Tensor, x_conv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The cell's output h (B, T, NH, DV) normed per head, plus the learnable skip of the conv branch
        x_conv, gated by SiLU of the output branch z: (B, T, I)."""
        return (self.out_norm(h) + self.learnable_skip * x_conv) * F.silu(z)


class sLSTMLayer(nn.Module):
    """The sLSTM block's mixer (paper Fig. 10): conv + SiLU feeding the input and forget gates, head-wise
    (block-diagonal) projections for the four gates, the sLSTM cell with head-wise recurrent matrices,
    and a per-head group norm."""

    def __init__(self, config: xLSTMConfig, block_idx: int):
        super().__init__()
        H, NH = config.hidden_size, config.slstm_num_heads
        self.config = config  # kernel_backend is read per call
        self.num_heads, self.head_dim = NH, H // NH
        self.block_idx, self.num_blocks = block_idx, config.num_blocks
        self.bias_init, self.recurrent_init = config.slstm_bias_init, config.slstm_recurrent_init
        k = config.slstm_conv_kernel_size
        self.conv = CausalConv1d(H, k) if k else None
        small = small_init_std(H)
        self.igate = HeadwiseLinear(H, NH, False, small)
        self.fgate = HeadwiseLinear(H, NH, False, small)
        self.zgate = HeadwiseLinear(H, NH, False, small)
        self.ogate = HeadwiseLinear(H, NH, False, small)
        # recurrent_kernel[h, j, g, d]: from unit j of head h's previous output to gate g of unit d
        self.recurrent_kernel = nn.Parameter(torch.empty(NH, self.head_dim, 4, self.head_dim))
        self.bias = nn.Parameter(torch.empty(NH, 4, self.head_dim))  # gates (i, f, z, o)
        self.group_norm = MultiHeadLayerNorm(H, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        H, DH = self.num_heads * self.head_dim, self.head_dim
        if self.recurrent_init == "zeros":
            init.zeros_(self.recurrent_kernel)
        else:
            init.uniform_(self.recurrent_kernel, -1 / math.sqrt(H), 1 / math.sqrt(H))
        bias = torch.zeros(self.num_heads, 4, DH)
        if self.bias_init == "powerlaw_blockdependent":
            # forget-gate bias: a power law over the units whose exponent grows with depth (official init)
            ratio = self.block_idx / (self.num_blocks - 1) if self.num_blocks > 1 else 0.0
            bias[:, 1] = -(-5.0 + 12.0 * (torch.arange(DH) / (DH - 1)) ** (0.3 + 1.3 * ratio))
        elif self.bias_init == "small_init":
            bias[:, 1] = torch.linspace(3.0, 6.0, DH)
        elif self.bias_init == "standard":
            bias.uniform_(-1 / math.sqrt(H), 1 / math.sqrt(H))
        init.copy_(self.bias, bias)

    def forward(self, x: torch.Tensor, state: dict | None = None, mask: torch.Tensor | None = None,
                output_state: bool = False, documents: "Documents | None" = None):
        """x: (B, T, H); state: {"conv", "h", "c", "n", "m"} or None; mask, documents as in mLSTMLayer.
        Returns (y (B, T, H), new state or None)."""
        B, T, H = x.shape
        state = state or {}
        resets, positions = documents or (None, None)
        window = None
        if self.conv is not None:
            conv_in = x if mask is None else x * mask[..., None].to(x.dtype)
            x_conv, window = self.conv(conv_in, state.get("conv"), positions)
            x_conv = F.silu(x_conv)
        else:
            x_conv = x
        gates = torch.stack([self.igate(x_conv), self.fgate(x_conv), self.zgate(x), self.ogate(x)], dim=-2)
        gates = gates.view(B, T, 4, self.num_heads, self.head_dim).transpose(2, 3)  # (B, T, NH, 4, DH)
        previous = tuple(state[key] for key in "hcnm") if "h" in state else None
        slstm = get_ops(self.config.kernel_backend, x.device)["slstm"]
        args = (gates, self.recurrent_kernel, self.bias, previous, output_state, mask)
        if resets is None:
            h, cell_state = slstm(*args)
        elif T == 1 or torch.compiler.is_compiling() or torch.jit.is_tracing():
            # (one step, or shapes that cannot depend on the documents: the reference, which resets in place)
            h, cell_state = slstm_recurrent(*args, resets=resets)
        else:  # packed rows as one document per row: fewer sequential steps, and any backend takes them
            h, cell_state = slstm_by_document(slstm, *args, resets=resets)
        y = self.group_norm(self.dropout(h))
        if not output_state:
            return y, None
        return y, {"conv": window, **dict(zip("hcnm", cell_state))}


def activation(name: str) -> nn.Module:
    """The feed-forward activation of the official name `name` (config.FFN_ACTIVATIONS): transformers'
    ACT2FN under its name there ("relu^2" is its "relu2"), plus SELU, which ACT2FN lacks."""
    return nn.SELU() if name == "selu" else ACT2FN["relu2" if name == "relu^2" else name]


class GatedFeedForward(nn.Module):
    """act(gate) * up, projected down: the feed-forward after each sLSTM cell."""

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        H, Fd = config.hidden_size, config.ffn_dim
        self.up_proj = Linear(H, 2 * Fd, config.ffn_use_bias, small_init_std(H))  # [gate | up]
        self.down_proj = Linear(Fd, H, config.ffn_use_bias, wang_init_std(H, config.num_blocks))
        self.act = activation(config.ffn_act_fn)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up_proj(x).chunk(2, dim=-1)
        return self.dropout(self.down_proj(self.act(gate) * up))


class mLSTMBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm residual block around an mLSTM layer."""

    def __init__(self, config: xLSTMConfig, block_idx: int):
        super().__init__()
        self.norm = LayerNorm(config.hidden_size, config.norm_eps)
        self.mlstm = mLSTMLayer(config)

    def forward(self, x, state=None, mask=None, output_state=False, documents=None):
        y, state = self.mlstm(self.norm(x), state, mask, output_state, documents)
        return x + y, state


class sLSTMBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm residual block around an sLSTM layer, followed by a residual gated feed-forward."""

    def __init__(self, config: xLSTMConfig, block_idx: int):
        super().__init__()
        self.norm = LayerNorm(config.hidden_size, config.norm_eps)
        self.slstm = sLSTMLayer(config, block_idx)
        self.ffn_norm = LayerNorm(config.hidden_size, config.norm_eps)
        self.ffn = GatedFeedForward(config)

    def forward(self, x, state=None, mask=None, output_state=False, documents=None):
        y, state = self.slstm(self.norm(x), state, mask, output_state, documents)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), state


class mLSTMLargeLayer(nn.Module):
    """xLSTM-7B's mLSTM layer (the `xlstm_large` design): no up-projection and no conv. q and k are
    projected to `qk_dim_factor`, v and the output gate to `v_dim_factor` of the width; input and forget
    gates per head, soft-capped; the mLSTM cell; per-head layer norm; sigmoid output gate; down-projection.
    """

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        H, NH, DQK, DV = config.hidden_size, config.mlstm_num_heads, config.mlstm_qk_dim, config.mlstm_v_dim
        self.config = config  # mlstm_mode, chunk_size and kernel_backend are read per call
        small = small_init_std(H)
        self.q_proj = Linear(H, DQK, config.use_bias, small)
        self.k_proj = Linear(H, DQK, config.use_bias, small)
        self.v_proj = Linear(H, DV, config.use_bias, small)
        self.ogate = Linear(H, DV, config.use_bias, small)
        self.igate = GateLinear(H, NH, bias_init=-10.0)
        self.fgate = GateLinear(H, NH, bias_init="linspace")
        self.out_norm = MultiHeadLayerNorm(DV, config.norm_eps, bias=config.use_bias)
        self.down_proj = Linear(DV, H, config.use_bias, wang_init_std(H, config.num_blocks))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, state: dict | None = None, mask: torch.Tensor | None = None,
                output_state: bool = False, documents: "Documents | None" = None):
        """x: (B, T, H); state: {"C", "n", "m"} or None; mask, documents as in mLSTMLayer.

        Returns (y (B, T, H), new state or None).
        """
        cap = self.config.gate_soft_cap
        i, f = soft_cap(self.igate(x), cap), soft_cap(self.fgate(x), cap)
        h, cell_state = run_mlstm_cell(self.config, self.q_proj(x), self.k_proj(x), self.v_proj(x), i, f,
                                       state or {}, mask, output_state,
                                       None if documents is None else documents.resets)
        y = self.dropout(self.down_proj(torch.sigmoid(self.ogate(x)) * self.out_norm(h)))
        return y, cell_state


class mLSTMLargeBlock(GradientCheckpointingLayer):
    """xLSTM-7B's block: pre-RMSNorm residual mLSTM layer, then a pre-RMSNorm residual SwiGLU feed-forward."""

    def __init__(self, config: xLSTMConfig, block_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, bias=config.use_bias)
        self.mlstm = mLSTMLargeLayer(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps, bias=config.use_bias)
        self.ffn = GatedFeedForward(config)

    def forward(self, x, state=None, mask=None, output_state=False, documents=None):
        y, state = self.mlstm(self.norm(x), state, mask, output_state, documents)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), state


#: the block class of each (design, block type)
BLOCKS = {("paper", "m"): mLSTMBlock, ("paper", "s"): sLSTMBlock, ("large", "m"): mLSTMLargeBlock}


# --------------------------------------------------------------------------------------------------
# Recurrent-state cache
# --------------------------------------------------------------------------------------------------


#: the names of each block type's cell states, in the order the cache layers keep them
MLSTM_STATE, SLSTM_STATE = ("C", "n", "m"), ("h", "c", "n", "m")


class xLSTMCacheLayer(LinearAttentionLayer):
    """One block's recurrent state, as a transformers linear-attention cache layer.

    `recurrent_states[i]` holds the cell state `names[i]`: mLSTM blocks C (B, NH, DK, DV), n (B, NH, DK),
    m (B, NH); sLSTM blocks h, c, n, m (B, NH, DH); all float32. `conv_states[0]` holds the causal conv's last
    K-1 inputs, time last as the library keeps conv states: (B, F, K-1) (none without a conv, as in the large
    design). The buffers are made at the first write and then updated in place: static shapes and addresses,
    which compiled decoding and CUDA graphs replay on. A write with autograd on (training with a carried state)
    replaces them instead, since the graph may still need the old values.
    """

    def __init__(self, names: tuple[str, ...] = (), conv: bool = True):
        super().__init__(number_of_states=max(len(names), 1))
        self.names, self.conv = tuple(names), conv  # (conv: the block's state has a "conv" entry, maybe None)

    def read(self) -> dict | None:
        """The state as a block takes it: {name: tensor, "conv": (B, K-1, F) view or None}, or None before any input."""
        if not self.has_previous_state[0]:
            return None
        state = {name: self.recurrent_states[i] for i, name in enumerate(self.names)}
        if self.conv:
            state["conv"] = self.conv_states[0].transpose(1, 2) if self.is_conv_states_initialized[0] else None
        return state

    def write(self, state: dict) -> None:
        """Store a block's new state (the dict `read` returns)."""
        if not self.has_previous_state[0]:  # (the first write, or one after a reset: the block's layout)
            names = tuple(name for name in state if name != "conv")
            if names != self.names:
                if any(self.is_recurrent_states_initialized.values()):
                    raise ValueError(f"this cache layer holds the states {self.names}, not {names}")
                self.__init__(names)
            self.conv = "conv" in state
            self.has_previous_state = dict.fromkeys(range(self.number_of_states), True)
        for i, name in enumerate(self.names):
            self._put(self.recurrent_states, self.is_recurrent_states_initialized, i, state[name])
        if state.get("conv") is not None:
            self._put(self.conv_states, self.is_conv_states_initialized, 0, state["conv"].transpose(1, 2))
            self.conv_kernel_size[0] = state["conv"].shape[1]  # (K-1: the stored width, as the library counts it)

    def _put(self, buffers: dict, initialized: dict, i: int, value: torch.Tensor) -> None:
        if self.device is None:
            self.device, self.dtype = value.device, value.dtype
        buffer = buffers[i]
        if value is buffer:  # (a decode step updated the buffer itself in place)
            return
        if torch.is_grad_enabled():
            buffers[i] = value  # (autograd may have saved the old values: no in-place update)
        elif not initialized[i] or buffer.shape != value.shape or buffer.dtype != value.dtype:
            buffers[i] = torch.empty(value.shape, dtype=value.dtype, device=value.device).copy_(value)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(buffers[i])
        else:
            buffer.copy_(value)
        initialized[i] = True

    def _map(self, fn) -> None:
        for buffers, initialized in ((self.conv_states, self.is_conv_states_initialized),
                                     (self.recurrent_states, self.is_recurrent_states_initialized)):
            for i in range(self.number_of_states):
                if initialized[i]:
                    buffers[i] = fn(buffers[i])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def detached(self) -> "xLSTMCacheLayer":
        """A copy (its own flags and buffer dicts) whose tensors are cut from the autograd graph."""
        copy = xLSTMCacheLayer()
        copy.__dict__.update({k: dict(v) if isinstance(v, dict) else v for k, v in vars(self).items()})
        copy._map(torch.Tensor.detach)
        return copy


class xLSTMCache(Cache):
    """The recurrent state of every block, which is all an xLSTM needs to continue a sequence: a transformers
    `Cache` of one `xLSTMCacheLayer` per block, plus the number of positions consumed. Memory is constant in
    the sequence length.

    - `generate()` takes it for every mode (greedy, sampling, beam search, `num_return_sequences`, chunked
      prefill, continuing from a returned cache with the whole sequence or only the new tokens).
    - It is compileable: fixed shapes, buffers updated in place (see `xLSTMCacheLayer`), so a compiled decode
      step runs once per batch size, and CUDA graphs replay on it. generate() compiles only when asked
      (`compile_config=...`).
    - It is a pytree node (registered below), so torch.export and transformers' exporters take it as an input
      and output: its leaves are the state tensors and the counter (`_cache_flatten_with_keys`; exported
      programs name them `cache.layers.{j}.conv_states.0`, `cache.layers.{j}.recurrent_states.{i}`,
      `cache.seen`: see xlstm_hf/export.py).
    - `states` reads every block's state as a dict ({"conv": (B, K-1, F) or None, "C", "n", "m"} or
      {"conv", "h", "c", "n", "m"}), None for a block that has seen no input.
    """

    def __init__(self, config: xLSTMConfig | None = None, num_blocks: int | None = None):
        num_blocks = num_blocks if num_blocks is not None else config.num_blocks
        names = {"m": MLSTM_STATE, "s": SLSTM_STATE}
        kinds = config.block_types if config is not None else [None] * num_blocks
        super().__init__(layers=[xLSTMCacheLayer(names.get(kind, ())) for kind in kinds])
        # positions consumed (padding included), as a 0-d tensor on the states' device: counted in place by
        # compiled and exported steps alike, read on the host only where generate() asks (get_seq_length)
        self.seen = None

    @property
    def is_linear(self) -> list[bool]:
        # transformers >= 5.24 cuts already-consumed positions off the prompt (by get_seq_length()) only for caches
        # whose layers are not "linear"; ours counts them exactly, and continuing from a returned cache with the
        # whole sequence needs that cut. (The 4D attention mask that generate() then builds for compileable
        # caches is not built for ours: xLSTMForCausalLM.create_masks_for_generate.)
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of positions (padding included) the state has consumed (a host sync on accelerators)."""
        return 0 if self.seen is None else int(self.seen)

    @property
    def seen_tokens(self) -> int:
        return self.get_seq_length()

    def advance(self, positions: int, device: torch.device) -> None:
        """Count `positions` more consumed positions (in place: a compiled or exported step can do it)."""
        if self.seen is None:
            self.seen = torch.zeros((), dtype=torch.long, device=device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.seen)
        self.seen.add_(positions)

    @property
    def has_state(self) -> bool:
        """Whether any block holds a state (a Python bool, fixed for a compiled or exported step)."""
        return any(layer.has_previous_state[0] for layer in self.layers)

    @property
    def states(self) -> list[dict | None]:
        return [layer.read() for layer in self.layers]

    @property
    def batch_size(self) -> int | None:
        for layer in self.layers:
            for i, ready in layer.is_recurrent_states_initialized.items():
                if ready:
                    return layer.recurrent_states[i].shape[0]
        return None

    def reset(self) -> None:
        """Back to the empty state, keeping the buffers (and their addresses). (The layers' reset zeroes their
        buffers and marks them as holding no state: `read` then gives None, so the blocks start from the true
        empty state, m = -inf, not from the zeros.)"""
        super().reset()
        if self.seen is not None:
            self.seen.zero_()

    def detach(self) -> "xLSTMCache":
        """A copy whose states are cut from the autograd graph (the same tensors' values, no history): truncated
        backpropagation through time continues from it, and the next segment's backward stops there."""
        copy = xLSTMCache(num_blocks=len(self.layers))
        copy.layers = [layer.detached() for layer in self.layers]
        copy.seen = None if self.seen is None else self.seen.clone()
        return copy

    @classmethod
    def from_states(cls, states: list[dict | None], seen_tokens: int = 0) -> "xLSTMCache":
        """A cache holding `states` (as `states` returns them, e.g. saved with torch.save)."""
        cache = cls(num_blocks=len(states))
        for layer, state in zip(cache.layers, states):
            if state is not None:
                layer.write(state)
        device = next((t.device for s in states if s for t in s.values() if t is not None), torch.device("cpu"))
        cache.advance(seen_tokens, device)
        return cache

    def __repr__(self) -> str:
        seen = "?" if self.seen is None or not reads_values(self.seen) else self.get_seq_length()
        return f"xLSTMCache(blocks={len(self.layers)}, seen_tokens={seen}, batch_size={self.batch_size})"


def _cache_flatten_with_keys(cache: xLSTMCache):
    """The cache as a pytree node: leaves (key, tensor) for every stored state tensor, named layers.{j}.{name}
    ("conv" for the conv window, time last) and "seen"; the context (which blocks hold which states) is plain
    data, fixed from one decode step to the next, so an exported decode step takes the cache it returns."""
    leaves, layers = [], []
    for j, layer in enumerate(cache.layers):
        conv = layer.is_conv_states_initialized[0]
        stored = [name for i, name in enumerate(layer.names) if layer.is_recurrent_states_initialized[i]]
        layers.append([list(layer.names), layer.conv, layer.conv_kernel_size[0] if conv else None, stored,
                       layer.has_previous_state[0]])
        if conv:
            leaves.append((pytree.MappingKey(f"layers.{j}.conv"), layer.conv_states[0]))
        leaves += [(pytree.MappingKey(f"layers.{j}.{name}"), layer.recurrent_states[i])
                   for i, name in enumerate(layer.names) if name in stored]
    if cache.seen is not None:
        leaves.append((pytree.MappingKey("seen"), cache.seen))
    return leaves, [layers, cache.seen is not None]


def _cache_flatten(cache: xLSTMCache):
    leaves, context = _cache_flatten_with_keys(cache)
    return [leaf for _, leaf in leaves], context


def _cache_unflatten(values, context) -> xLSTMCache:
    values, (layers, has_seen) = iter(values), context
    cache = xLSTMCache(num_blocks=len(layers))
    for layer, (names, has_conv, conv_width, stored, live) in zip(cache.layers, layers):
        layer.__init__(tuple(names), has_conv)
        if conv_width is not None:
            layer.conv_states[0], layer.is_conv_states_initialized[0] = next(values), True
            layer.conv_kernel_size[0] = conv_width
        for i, name in enumerate(names):
            if name in stored:
                layer.recurrent_states[i], layer.is_recurrent_states_initialized[i] = next(values), True
        layer.has_previous_state = dict.fromkeys(range(layer.number_of_states), live)
    cache.seen = next(values) if has_seen else None
    return cache


pytree.register_pytree_node(
    xLSTMCache, _cache_flatten, _cache_unflatten, serialized_type_name=f"{__name__}.xLSTMCache",
    flatten_with_keys_fn=_cache_flatten_with_keys, to_dumpable_context=json.dumps, from_dumpable_context=json.loads)
# a saved torch.export program keeps its example inputs, a cache among them: torch.load(weights_only=True) may
# rebuild it (tensors and plain values only)
torch.serialization.add_safe_globals([xLSTMCache, xLSTMCacheLayer])


# --------------------------------------------------------------------------------------------------
# Hugging Face models
# --------------------------------------------------------------------------------------------------


class xLSTMPreTrainedModel(xLSTMHubMixin, PreTrainedModel):
    config: xLSTMConfig
    config_class = xLSTMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["mLSTMBlock", "sLSTMBlock", "mLSTMLargeBlock"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Every module of ours that owns parameters knows its official init; containers own none.
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=small_init_std(module.embedding_dim))
        elif isinstance(module, (Linear, GateLinear, HeadwiseLinear, LayerNorm, CausalConv1d, mLSTMLayer, sLSTMLayer)):
            module.reset_parameters()
        elif type(module) is nn.Linear:  # the LM head that resize_token_embeddings builds: the head's init
            init.normal_(module.weight, std=small_init_std(module.in_features))
            if module.bias is not None:
                init.zeros_(module.bias)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our state lives in xLSTMCache, not in a key/value cache


#: tokens (over the batch) per segment of a long inference forward (xLSTMModel._prefill_segment)
PREFILL_SEGMENT_TOKENS = 2048


class xLSTMModel(xLSTMPreTrainedModel):
    """The block stack: token embedding, mLSTM/sLSTM blocks, final norm. Returns hidden states."""

    def __init__(self, config: xLSTMConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.dropout) if config.add_embedding_dropout else nn.Identity()
        self.blocks = nn.ModuleList(
            [BLOCKS[config.block_design, kind](config, j) for j, kind in enumerate(config.block_types)]
        )
        norm = RMSNorm if config.block_design == "large" else LayerNorm
        self.final_norm = norm(config.hidden_size, config.norm_eps) if config.add_post_blocks_norm else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: xLSTMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: xLSTMCache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (B, T) or inputs_embeds (B, T, H); attention_mask (B, T) or (B, past + T) with 1 for real
        tokens and 0 for padding; cache (or its old name past_key_values): an `xLSTMCache` to continue from
        (always advanced in place; returned when `use_cache`).

        Packed rows (several documents in one row, as DataCollatorWithFlattening makes them): `position_ids`
        that restart (or `seq_idx`, or `cu_seq_lens_q`/`cu_seq_lens_k` for one row) say where documents start
        (`document_starts`), and every recurrent state and conv window starts afresh there: each document
        computes what it computes alone. A returned cache holds each row's last document. position_ids that
        count up by one carry nothing a recurrent model needs."""
        refuse_unsupported_inputs(kwargs)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
            if reads_values(input_ids):
                outside = (input_ids < 0) | (input_ids >= self.config.vocab_size)
                if outside.any():
                    raise ValueError(f"input_ids contains id {input_ids[outside][0].item()}, outside the vocabulary "
                                     f"[0, {self.config.vocab_size})")
            inputs_embeds = self.embeddings(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch, length, {self.config.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        B, T = inputs_embeds.shape[:2]
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cache = _one_cache(cache, past_key_values)
        if cache is not None and not isinstance(cache, xLSTMCache):
            raise ValueError(f"the cache (past_key_values) must be an xLSTMCache, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = xLSTMCache(self.config)
        if cache is not None:
            if len(cache) != len(self.blocks):
                raise ValueError(f"the cache holds {len(cache)} blocks, the model has {len(self.blocks)}")
            if cache.batch_size is not None and cache.batch_size != B:
                raise ValueError(f"the cache has batch size {cache.batch_size}, the input has {B}")
        # positions the cache has seen: for checking the mask's width, where reading the counter is free
        past = 0 if cache is None or cache.seen is None else cache.get_seq_length() if reads_values(cache.seen) else None
        mask = self._padding_mask(attention_mask, B, T, past)
        if "_resets" in kwargs:  # (a segment of a long prefill, below: the starts of the whole call)
            resets = kwargs.pop("_resets")
        else:
            resets = document_starts(position_ids, kwargs, mask, B, T, cache is not None and cache.has_state)
        segment = self._prefill_segment(B, T, output_hidden_states)
        if segment:  # a long prefill, segment by segment through a cache (see _prefill_segment)
            cache = cache if cache is not None else xLSTMCache(self.config)
            part = lambda t, s: None if t is None else t[:, s:s + segment]  # noqa: E731
            hidden = torch.cat([self(inputs_embeds=inputs_embeds[:, s:s + segment], cache=cache, use_cache=True,
                                     attention_mask=part(mask, s), _resets=part(resets, s),
                                     return_dict=True).last_hidden_state for s in range(0, T, segment)], dim=1)
            out_cache = cache if use_cache else None
            if not return_dict:
                return tuple(v for v in (hidden, out_cache) if v is not None)
            return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_NAME: out_cache})

        hidden = self.embedding_dropout(inputs_embeds)
        all_hidden = (hidden,) if output_hidden_states else None
        # A cache that is passed in is read and advanced (its states are handed to the cells, which may
        # update them in place), whether or not it is also returned (use_cache).
        documents = Documents.of(resets)
        compiled = (T == 1 and cache is not None and mask is None and documents is None
                    and inference_compiled(self, hidden.device, self.blocks))
        for j, block in enumerate(self.blocks):
            state = cache.layers[j].read() if cache is not None else None
            # (blocks are called directly when not compiling our decode step: under a user's torch.compile,
            # one shared decode_call frame would be re-specialised for every block type and length)
            args = (hidden, state, mask, cache is not None)
            hidden, new_state = decode_call(True, block, *args) if compiled else block(*args, documents=documents)
            if cache is not None:  # (into the layer's own dense buffers: one layout for every compiled step)
                cache.layers[j].write(new_state)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.final_norm(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        if cache is not None:
            cache.advance(T, hidden.device)
        out_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden, out_cache, all_hidden) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=all_hidden, **{CACHE_NAME: out_cache})

    def _prefill_segment(self, batch: int, length: int, output_hidden_states: bool) -> int | None:
        """The segment length for a long inference forward, or None for one pass. Without autograd the
        state carried through a cache makes segments exact (they start at chunk boundaries), and a segment
        of about PREFILL_SEGMENT_TOKENS tokens (over the batch) keeps each block's intermediates in cache:
        125M model on the Intel VM, B=8, T=2048: 398 -> 538 tok/s in segments of 256; B=1, T=8192: 403 ->
        509 in segments of 2048 (B=1, T=2048 is fastest in one pass)."""
        if self.training or torch.is_grad_enabled() or output_hidden_states or torch.compiler.is_compiling():
            return None
        chunk = self.config.chunk_size
        segment = max(chunk, PREFILL_SEGMENT_TOKENS // batch // chunk * chunk)
        return segment if length > segment else None

    @staticmethod
    def _padding_mask(attention_mask, batch: int, length: int, past: int | None) -> torch.Tensor | None:
        """The (B, T) bool mask of real positions for this call, or None when every position is known to be real.

        Accepts (B, T), or (B, past + T) as `generate()` passes it (the whole sequence so far; where `past`
        is None, unknown without a host sync or while tracing, any width of at least T), holding 1 (or
        True) for real tokens and 0 for padding, as bool, integer or float. Other values are refused where
        they can be read for free (see `reads_values`): an additive mask (0 = keep, -inf = masked) means the
        opposite. Elsewhere (tracing, accelerators) the mask is used as given, without a host sync."""
        if attention_mask is None:
            return None
        width = attention_mask.shape[1] if attention_mask.dim() == 2 else None
        fits = width in (length, past + length) if past is not None else width is not None and width >= length
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or not fits:
            widths = [f"{length}"] + ([f"{past + length}"] if past else ["past + " + str(length)] if past is None else [])
            expected = " or ".join(f"({batch}, {w})" for w in widths)
            raise ValueError(f"attention_mask must have shape {expected}, got {tuple(attention_mask.shape)}")
        if attention_mask.is_complex():
            raise ValueError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")
        mask = attention_mask[:, attention_mask.shape[1] - length:]
        if not reads_values(mask):
            return mask != 0
        if attention_mask.dtype != torch.bool:
            bad = (mask != 0) & (mask != 1)
            if bad.any():
                raise ValueError(
                    f"attention_mask must hold 1 for real tokens and 0 for padding, got the value {mask[bad][0].item()} "
                    "(an additive mask, 0 = keep and a large negative number = masked, is the opposite: pass "
                    "`(additive_mask == 0).long()`)")
        mask = mask != 0
        return None if mask.all() else mask


# --------------------------------------------------------------------------------------------------
# Language-model loss without (B, T, V) logits
# --------------------------------------------------------------------------------------------------

#: logits computed at a time by `linear_cross_entropy`: 2^24 fp32 values (64 MiB) per chunk
LOSS_CHUNK_ELEMENTS = 1 << 24


# The loss as a custom operator (`torch.library`): its loop over chunks of rows stays opaque to torch.compile,
# which would otherwise unroll it, and specialise the graph on the number of tokens (a recompile per length).
# The loss is a scalar, so its gradients are computed chunk by chunk in the forward (softmax minus one-hot,
# through the soft cap, times hidden or weight) and only scaled in the backward: no chunk's logits outlive
# it. Logits, softmax and gradients are float32, as the unfused loss computes them (float64 for float64
# weights). Gradients that are not needed come back empty.


@torch.library.custom_op("xlstm_hf::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None,
                          ignore_index: int, rows: int, needs_hidden: bool, needs_weight: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, d loss / d hidden, d loss / d weight) of soft_cap(hidden @ weight^T) against targets:
    hidden (N, H), weight (V, H), targets (N,); `rows` rows of logits at a time."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # float32 (float64 for float64 weights)
    grad_hidden = torch.zeros_like(hidden, dtype=dtype) if needs_hidden else hidden.new_empty(0, dtype=dtype)
    grad_weight = torch.zeros_like(weight, dtype=dtype) if needs_weight else weight.new_empty(0, dtype=dtype)
    total = hidden.new_zeros((), dtype=dtype)
    weight32 = weight.to(dtype) if needs_hidden else None  # once, not per chunk (a copy for bf16 weights)
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        raw = F.linear(h, weight).to(dtype)
        z = soft_cap(raw, cap)
        valid = t != ignore_index
        safe_t = t.masked_fill(~valid, 0)
        lse = torch.logsumexp(z, dim=-1)
        total += ((lse - z.gather(-1, safe_t[:, None])[:, 0]) * valid).sum()
        if needs_hidden or needs_weight:
            # d loss / d z = softmax - one-hot, the softmax as exp(z - lse) (written over z when no cap
            # needs z later); rows of ignored targets are zeroed in the (rows, H) factors, not in g
            g = torch.sub(z, lse[:, None], out=z if cap is None else None).exp_()
            g[torch.arange(len(t), device=t.device), safe_t] -= 1
            if cap is not None:
                g *= 1 - (z / cap).square()  # d(cap tanh(raw / cap)) / d raw
            keep = valid[:, None].to(dtype)
            if needs_hidden:
                grad_hidden[start:start + rows] = (g @ weight32).mul_(keep)
            if needs_weight:
                grad_weight.addmm_(g.T, h.to(dtype) * keep)
    return total, grad_hidden, grad_weight


@_linear_cross_entropy.register_fake
def _(hidden, weight, targets, cap, ignore_index, rows, needs_hidden, needs_weight):
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return (hidden.new_empty((), dtype=dtype),
            torch.empty_like(hidden, dtype=dtype) if needs_hidden else hidden.new_empty(0, dtype=dtype),
            torch.empty_like(weight, dtype=dtype) if needs_weight else weight.new_empty(0, dtype=dtype))


def _loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype
    ctx.mark_non_differentiable(*output[1:])


def _loss_backward(ctx, grad_total, *_):
    grad_hidden, grad_weight = ctx.saved_tensors
    dh = (grad_hidden * grad_total).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    dw = (grad_weight * grad_total).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None, None, None


_linear_cross_entropy.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def linear_cross_entropy(hidden, weight, labels, cap=None, num_items_in_batch=None, ignore_index=-100,
                         shift_labels=None):
    """transformers' causal-LM loss (`ForCausalLMLoss`) of the logits soft_cap(hidden @ weight^T, cap),
    computed without ever holding the (B, T, V) logits: LOSS_CHUNK_ELEMENTS logits at a time.

    hidden (B, T, H); weight (V, H); labels (B, T), shifted by one here (or `shift_labels` already shifted),
    `ignore_index` skipped; the mean over counted targets, or the sum over `num_items_in_batch`."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    grads = torch.is_grad_enabled()
    total = torch.ops.xlstm_hf.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets,
                                                    None if cap is None else float(cap),
                                                    ignore_index, rows, grads and hidden.requires_grad,
                                                    grads and weight.requires_grad)[0]
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


class xLSTMForCausalLM(xLSTMPreTrainedModel, GenerationMixin):
    """xLSTM language model: the block stack and a linear LM head."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: xLSTMConfig):
        super().__init__(config)
        self.backbone = xLSTMModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, small_init_std(config.hidden_size))
        self.lm_head.matvec_rows = 8  # its input is the compiled call's own (nothing to recompute per row)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _get_resized_lm_head(self, old_lm_head, new_num_tokens=None, transposed=False, mean_resizing=True):
        # transformers builds the resized head as a plain nn.Linear (initialised by _init_weights, or from the old
        # rows' mean with mean_resizing); give it back our Linear, which the compiled decode path calls
        resized = super()._get_resized_lm_head(old_lm_head, new_num_tokens, transposed, mean_resizing)
        if resized is old_lm_head or not isinstance(old_lm_head, Linear):
            return resized
        with torch.device("meta"):  # no throwaway allocation: the parameters are replaced below
            head = type(old_lm_head)(resized.in_features, resized.out_features, resized.bias is not None,
                                     old_lm_head.init_std)
        head.weight, head.bias = resized.weight, resized.bias
        head.matvec_rows = old_lm_head.matvec_rows
        return head

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # generate() would make position_ids from the mask and pass them every step: a recurrent model needs
        # none, and with them each step would look for document starts (a host sync per token on a GPU, and
        # the packed path under torch.compile and export). position_ids a caller passes still count.
        return None

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # only the mask of the tokens this call feeds: the state holds the rest (and an exported decode step
        # then takes a (B, 1) mask, not one that grows by a column per token)
        mask, fed = inputs.get("attention_mask"), inputs.get("input_ids")
        fed = fed if fed is not None else inputs.get("inputs_embeds")
        if mask is not None and fed is not None and mask.dim() == 2 and mask.shape[1] > fed.shape[1]:
            inputs["attention_mask"] = mask[:, mask.shape[1] - fed.shape[1]:].contiguous()  # (compile guards on strides)
        return inputs

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        # generate() builds a 4D causal mask for compileable caches of attention layers; a recurrent model
        # takes the 2D padding mask as it is
        return attention_mask

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        # Our cache is compileable, which on CUDA would compile every generate() call (a one-time cost of
        # many seconds); as for transformers' Mamba models, generate() compiles only when asked to, with
        # `compile_config` (CompileConfig(): CUDA graphs on CUDA).
        return generation_config.compile_config is not None and super()._valid_auto_compile_criteria(
            model_kwargs, generation_config)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # Create our cache up front (generate() only creates key/value caches itself), so that chunked
        # prefill and continuing from the returned cache work like for attention models.
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache and model_kwargs.get(CACHE_NAME) is None:
            model_kwargs[CACHE_NAME] = xLSTMCache(self.config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: xLSTMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: xLSTMCache | None = None,
        position_ids: torch.LongTensor | None = None,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (soft-capped if `config.logits_soft_cap`) for every position (or the last `logits_to_keep`);
        with `labels`, the shifted next-token cross-entropy (labels -100 are ignored; `kwargs` may hold the
        loss's `num_items_in_batch`, `ignore_index`, `shift_labels`). Other inputs as in `xLSTMModel.forward`.

        `skip_logits` (default: in training mode, when `labels` or `shift_labels` are given): compute the loss
        a chunk of positions at a time (`linear_cross_entropy`) without the (B, T, V) logits, and return logits
        only for the positions `logits_to_keep` asks for (none for its default 0)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        has_labels = labels is not None or kwargs.get("shift_labels") is not None
        skip_logits = (self.training and has_labels) if skip_logits is None else skip_logits
        if skip_logits and not has_labels:
            raise ValueError("skip_logits=True needs labels (or shift_labels): without them there is nothing to compute")
        # a head replaced by another module (e.g. PEFT's LoRA layer) is called as a module: logits as usual
        skip_logits = skip_logits and type(self.lm_head) in (Linear, nn.Linear) and self.lm_head.bias is None
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
        outputs = self.backbone(
            input_ids, attention_mask=attention_mask, cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True,
            position_ids=position_ids, **kwargs,
        )
        hidden = outputs.last_hidden_state.to(self.lm_head.weight.dtype)
        loss = logits = None
        if skip_logits:
            loss = linear_cross_entropy(hidden, self.lm_head.weight, labels, self.config.logits_soft_cap, **loss_kwargs)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        if not (skip_logits and isinstance(logits_to_keep, int) and logits_to_keep == 0):
            # decoding (one position per row): compiled, one graph per batch size up to matvec_rows
            compiled = (inference_compiled(self, hidden.device, self.lm_head) and hidden.shape[1] == 1
                        and hidden.shape[0] <= getattr(self.lm_head, "matvec_rows", 0))
            if compiled:  # one layout for the compiled head (a prefill's last position is a strided view)
                hidden = dense(hidden)
            logits = soft_cap(decode_call(compiled, self.lm_head, hidden).float(), self.config.logits_soft_cap)
        if has_labels and not skip_logits:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        if not return_dict:
            cache = getattr(outputs, CACHE_NAME)
            return tuple(v for v in (loss, logits, cache, outputs.hidden_states) if v is not None)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: getattr(outputs, CACHE_NAME)}
        )


__all__ = ["xLSTMCache", "xLSTMForCausalLM", "xLSTMModel", "xLSTMPreTrainedModel"]
