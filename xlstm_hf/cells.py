"""The two xLSTM cells in plain PyTorch: the reference every faster backend is tested against.

mLSTM (paper eqs. 19-27): matrix memory C, normaliser n and stabiliser m per head,

    m_t = max(log f_t + m_{t-1}, i~_t)                    (log f_t = logsigmoid(f~_t))
    C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i~_t - m_t) k_t v_t^T
    n_t = exp(log f_t + m_{t-1} - m_t) n_{t-1} + exp(i~_t - m_t) k_t
    h_t = C_t^T q_t / (max(|n_t . q_t|, exp(-m_t)) + eps)          (k_t scaled by 1/sqrt(d_k))

in three forms that compute the same function: `mlstm_parallel` (quadratic, the paper's parallel form),
`mlstm_chunkwise` (linear memory; parallel inside chunks, recurrent across them) and `mlstm_recurrent`
(one step at a time; `mlstm_step` is its body and the decode path).

sLSTM (paper eqs. 8-17): scalar memory per unit with exponential input gate, sigmoid forget gate in log
space and head-wise recurrent matrices R, in `slstm_recurrent`.

Conventions shared by all functions:
- the stabilisers m are constants for autograd (detached where they are computed). The cells' outputs do
  not depend on them (the sLSTM exactly, the mLSTM up to its eps), so output gradients are the true ones;
  gradients of returned states are those with m held fixed, which is what chaining calls needs, and an
  m passed in as initial state still gets its gradient. Fused kernels follow the same rule;
- an empty state has C = n = 0 and m = -inf, so the first step sets m_1 = i~_1; this is exactly the
  row-wise stabiliser of the parallel form (and of the official package's `forward`);
- a stabiliser of -inf (nothing seen yet) is replaced by 0 where it is subtracted, which keeps exp() finite;
- the computation runs in float32 (float64 if given float64) whatever the input dtype, also under
  `torch.autocast` (which is turned off inside the cells: it would run their matmuls in bf16); states are
  kept in that dtype, outputs take the dtype of v.

Signatures follow one pattern: `(inputs..., initial_state=None, output_final_state=False) -> (out, state)`.
"""

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch._higher_order_ops import scan
from torch.autograd.function import once_differentiable

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C (B,NH,DK,DV), n (B,NH,DK), m (B,NH)
SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # h, c, n, m: each (B,NH,DH)


def _up(*tensors: torch.Tensor):
    """The tensors in the compute dtype: float32, or float64 when given float64 (used by tests)."""
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


def autocast_off(device_type: str):
    """A context with autocast turned off on `device_type` where it is on (else a no-op context)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def float32_compute(cell):
    """Run `cell` (whose first argument is a tensor) with autocast off on that tensor's device, so that
    `_up`'s float32 is what its matmuls compute in. Autocast stays on around the cells (the projections).
    Hand-written backwards use `autocast_off` too: one called inside an autocast region would run under it."""
    @functools.wraps(cell)
    def wrapper(x, *args, **kwargs):
        with autocast_off(x.device.type):
            return cell(x, *args, **kwargs)

    return wrapper


def _finite(m: torch.Tensor) -> torch.Tensor:
    """The stabiliser to subtract: m where finite, 0 where m = -inf (no input seen yet)."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def mlstm_zero_state(batch: int, heads: int, dk: int, dv: int, device=None, dtype=torch.float32) -> MLSTMState:
    """The empty mLSTM state: C = 0, n = 0, m = -inf."""
    return (
        torch.zeros(batch, heads, dk, dv, device=device, dtype=dtype),
        torch.zeros(batch, heads, dk, device=device, dtype=dtype),
        torch.full((batch, heads), float("-inf"), device=device, dtype=dtype),
    )


@float32_compute
def mlstm_parallel(q, k, v, i, f, initial_state=None, output_final_state=False, eps=1e-6, chunk_size=None,
                   resets=None):
    """mLSTM over a whole sequence in the quadratic parallel form (no state in or out).

    q, k: (B, NH, T, DK); v: (B, NH, T, DV); i, f: (B, NH, T) input/forget gate pre-activations; resets:
    optional (B, T) bool, True where a new sequence starts (packed documents: a token sees only its own);
    chunk_size: unused (the forms share one signature).
    Returns (h (B, NH, T, DV), None).
    """
    if initial_state is not None or output_final_state:
        raise ValueError("mlstm_parallel takes no state; use mlstm_chunkwise to read or write a state")
    out_dtype = v.dtype
    q, k, v, i, f = _up(q, k, v, i, f)
    T = q.shape[-2]
    k = k / math.sqrt(k.shape[-1])
    b = F.logsigmoid(f).cumsum(-1)  # b_t = sum_{s<=t} log f_s
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if resets is not None:  # s and t in the same document: the same count of document starts up to them
        document = check_resets(resets, q.shape[0], T).cumsum(-1)[:, None]
        causal = causal & (document[..., :, None] == document[..., None, :])
    # log D[t, s] = log(f_{s+1} ... f_t) + i~_s for s <= t
    log_d = (b[..., :, None] - b[..., None, :] + i[..., None, :]).masked_fill(~causal, float("-inf"))
    m = log_d.amax(-1).detach()  # (B, NH, T): the stabiliser m_t of the recurrent form
    scores = (q @ k.transpose(-1, -2)) * torch.exp(log_d - _finite(m)[..., None])
    normaliser = torch.maximum(scores.sum(-1).abs(), torch.exp(-m)) + eps
    h = (scores / normaliser[..., None]) @ v
    return h.to(out_dtype), None


# The chunkwise form, one chunk at a time. Per (batch, head) and chunk of L positions t, s, with the state
# (C, n, m) carried into it and b_t = sum of log f over the chunk up to t (k already scaled by 1/sqrt(d_k)):
#
#     log D_ts = b_t - b_s + i~_s (s <= t)        stab_t = max(max_s log D_ts, b_t + m)       (stab0: -inf -> 0)
#     S_ts = (q_t . k_s) exp(log D_ts - stab0_t)   carry_t = exp(b_t + m - stab0_t)
#     h_t = (S v + carry C^T q)_t / (max(|(S 1 + carry n . q)_t|, exp(-stab_t)) + eps)
#     m' = max(b_L + m, max_s (b_L - b_s + i~_s))  u_s = exp(b_L - b_s + i~_s - m'0)   decay = exp(b_L + m - m'0)
#     C' = decay C + sum_s u_s k_s v_s^T            n' = decay n + sum_s u_s k_s
#
# The helpers below are these formulas; `mlstm_chunkwise` and the memory-saving `MLSTMChunkwiseFunction`
# (whose backward recomputes each chunk from its boundary state) both call them.


def _mlstm_prepare(q, k, v, i, f, initial_state, resets=None):
    """The inputs in the compute dtype, k scaled, log f, and the initial state (C, n, m). `resets` (B, T) bool:
    True where a new sequence starts (packed documents): the state carried into that position is dropped,
    which for the mLSTM is exactly a forget gate of zero, log f = -inf (see `_log_gate_sums`)."""
    q, k, v, i, f = _up(q, k, v, i, f)
    B, NH, _, DK = q.shape
    k = k / math.sqrt(DK)
    if initial_state is None:
        initial_state = mlstm_zero_state(B, NH, DK, v.shape[-1], q.device, q.dtype)
    C, n, m = (s.to(q.dtype) for s in initial_state)
    log_f = F.logsigmoid(f)
    if resets is not None:
        log_f = log_f.masked_fill(check_resets(resets, q.shape[0], q.shape[-2])[:, None, :], float("-inf"))
    return q, k, v, i, log_f, C, n, m


def check_resets(resets, B, T):
    """`resets` itself, if it is a (B, T) bool tensor; else a ValueError that says what it must be."""
    if resets.shape != (B, T) or resets.dtype != torch.bool:
        raise ValueError(f"resets must be a bool tensor of shape (batch, length) = {(B, T)}, got "
                         f"{tuple(resets.shape)} {resets.dtype}")
    return resets


def _mlstm_chunks(chunk_size, *tensors):
    """Split (B, NH, T, D) and (B, NH, T) tensors into chunks along T: one tuple per chunk. split() rather
    than slicing in a loop: its backward is one concatenation, not a zero-filled full-size gradient per chunk."""
    return zip(*(t.split(chunk_size, dim=-2 if t.dim() == 4 else -1) for t in tensors))


def _log_gate_sums(log_fc, segmented):
    """b = the cumulative sum of log f over the chunk, and the segments: with `segmented`, a log f of -inf
    (a reset: the forget gate is exactly zero) starts a new segment; b then sums the finite log f only (so
    that differences b_t - b_s stay finite) and seg (.., L) numbers the segments from 0 (the one that
    continues the carried state). Without, seg is None."""
    if not segmented:
        return log_fc.cumsum(-1), None
    reset = torch.isneginf(log_fc)
    return log_fc.masked_fill(reset, 0.0).cumsum(-1), reset.cumsum(-1)


def _chunk_weights(b, ic, m, above_diagonal, seg=None):
    """Weights inside a chunk: w = exp(log D - stab0) (zero above the diagonal), carry (L,), stab (L,).
    With segments (`_log_gate_sums`) a token sees only its own segment, and the carried state only segment 0."""
    L = b.shape[-1]
    log_d = (b[..., :, None] - b[..., None, :] + ic[..., None, :]).masked_fill(above_diagonal[:L, :L], float("-inf"))
    log_carry = b + m[..., None]  # weight of the carried state at each position
    if seg is not None:
        log_d = log_d.masked_fill(seg[..., :, None] != seg[..., None, :], float("-inf"))
        log_carry = log_carry.masked_fill(seg > 0, float("-inf"))
    stab = torch.maximum(log_d.amax(-1), log_carry).detach()  # = m_t of the recurrent form
    stab0 = _finite(stab)
    return torch.exp(log_d - stab0[..., None]), torch.exp(log_carry - stab0), stab


def _chunk_scores(qc, kc, n, w, carry, stab, eps):
    """The chunk's scores S (L, L), denominators and normalisers (L,). n None: nothing carried in."""
    scores = (qc @ kc.transpose(-1, -2)) * w
    denominator = scores.sum(-1)
    if n is not None:
        denominator = denominator + carry * (qc @ n[..., None]).squeeze(-1)
    normaliser = torch.maximum(denominator.abs(), torch.exp(-stab)) + eps
    return scores, denominator, normaliser


def _chunk_end(b, ic, m, seg=None):
    """Weights that advance the state over the chunk: u (L,), decay, and the new stabiliser m'. With
    segments only the last one reaches the end state, and the carried state only if there is no reset."""
    log_w = b[..., -1:] - b + ic  # weight of each token's k v^T in the end-of-chunk state
    log_decay = b[..., -1] + m
    if seg is not None:
        log_w = log_w.masked_fill(seg != seg[..., -1:], float("-inf"))
        log_decay = log_decay.masked_fill(seg[..., -1] > 0, float("-inf"))
    m_new = torch.maximum(log_decay, log_w.amax(-1)).detach()
    m_new0 = _finite(m_new)
    return torch.exp(log_w - m_new0[..., None]), torch.exp(log_decay - m_new0), m_new


def _chunk_advance(kc, vc, ic, b, C, n, m, in_place=False, seg=None):
    """The state (C, n, m) at the end of the chunk, from the state carried into it (C, n None: the zero
    state, with m = -inf). `in_place`: C is the loop's own buffer, with no autograd and nothing else
    holding it, and is updated where it lies (one read and write of the DK x DV state per chunk instead
    of three passes: ~40% of the update's time). seg: see `_log_gate_sums`."""
    u, decay, m_new = _chunk_end(b, ic, m, seg)
    kw = kc * u[..., None]
    if C is None:
        return kw.transpose(-1, -2) @ vc, kw.sum(-2), m_new
    if in_place:
        C.mul_(decay[..., None, None]).view(-1, *C.shape[-2:]).baddbmm_(
            kw.reshape(-1, *kw.shape[-2:]).transpose(-1, -2), vc.reshape(-1, *vc.shape[-2:]))
    else:
        C = decay[..., None, None] * C + kw.transpose(-1, -2) @ vc
    return C, decay[..., None] * n + kw.sum(-2), m_new


def _mlstm_chunk(qc, kc, vc, ic, log_fc, C, n, m, eps, above_diagonal, in_place=False, advance=True,
                 segmented=False):
    """One chunk: its outputs h (B, NH, L, DV) and the state (C, n, m) at its end. C, n None: the zero
    state carried in (m = -inf: no carried terms to compute); `advance` False: the end state is not
    needed (None, None, None); `segmented`: log f may hold resets (-inf, see `_log_gate_sums`)."""
    b, seg = _log_gate_sums(log_fc, segmented)  # (B, NH, L)
    w, carry, stab = _chunk_weights(b, ic, m, above_diagonal, seg)
    scores, _, normaliser = _chunk_scores(qc, kc, n, w, carry, stab, eps)
    num = scores @ vc
    if C is not None:
        num = num + carry[..., None] * (qc @ C)
    h = num / normaliser[..., None]
    return h, (_chunk_advance(kc, vc, ic, b, C, n, m, in_place, seg) if advance else (None, None, None))


def _above_diagonal(chunk_size, T, device):
    L_max = min(chunk_size, T)
    return torch.ones(L_max, L_max, dtype=torch.bool, device=device).triu(1)  # built once, not per chunk


def _mlstm_chunkwise_loop(q, k, v, i, log_f, C, n, m, eps, chunk_size, states=None, state_every=1,
                          zero_start=False, final_state=True, segmented=False):
    """The chunk loop on prepared inputs (`_mlstm_prepare`): (h, final state). `states`, a list, receives
    the state carried into every `state_every`-th chunk (chunks 0, state_every, ...). Where no states are
    kept: `zero_start` says (C, n, m) is the zero state, so the first chunk skips the carried terms, and
    without `final_state` the last chunk skips its state update (returning None for the state): the
    same values, with one (L, DK) x (DK, DV) product fewer per sequence at each end (a sequence of one
    chunk is the parallel form alone)."""
    above_diagonal = _above_diagonal(chunk_size, q.shape[-2], q.device)
    if states is not None:
        zero_start, final_state = False, True  # (the saved states are every chunk's real (C, n, m))
    elif zero_start:
        C = n = None
    # without autograd and with no state kept, C is updated in place, in a copy of the caller's
    in_place = states is None and not torch.is_grad_enabled()
    if in_place and C is not None:
        C = C.clone(memory_format=torch.contiguous_format)
    outputs = []
    chunks = -(-q.shape[-2] // chunk_size)
    for c, (qc, kc, vc, ic, log_fc) in enumerate(_mlstm_chunks(chunk_size, q, k, v, i, log_f)):
        if states is not None and c % state_every == 0:
            states.append((C, n, m))
        h, (C, n, m) = _mlstm_chunk(qc, kc, vc, ic, log_fc, C, n, m, eps, above_diagonal, in_place,
                                    advance=final_state or c < chunks - 1, segmented=segmented)
        outputs.append(h)
    return torch.cat(outputs, dim=-2), ((C, n, m) if final_state else None)


@float32_compute
def mlstm_chunkwise(q, k, v, i, f, initial_state=None, output_final_state=False, eps=1e-6, chunk_size=64,
                    resets=None):
    """mLSTM over a sequence chunk by chunk: memory linear in T, any T (not only multiples of chunk_size).

    Inside a chunk the parallel form is used, with the carried state (C, n, m) as an extra term; between
    chunks the state is advanced to the chunk's end. Shapes as in `mlstm_parallel`; `initial_state` and
    the returned state are (C, n, m) as in `mlstm_zero_state`; `resets` as in `mlstm_parallel` (a reset also
    drops the initial state). Autograd records every chunk's intermediates;
    `mlstm_chunkwise_recompute` computes the same with a backward that recomputes them, and under
    torch.compile the loop is the custom operator `xlstm_hf::mlstm_chunkwise_forward` with that backward.
    """
    out_dtype = v.dtype
    prepared = _mlstm_prepare(q, k, v, i, f, initial_state, resets)
    segmented = resets is not None
    if torch.compiler.is_compiling():  # one opaque operator, not a loop unrolled per sequence length
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in prepared)
        every = 1 if needs_grad else 1 << 30  # (inference keeps only the first state)
        h, *state = torch.ops.xlstm_hf.mlstm_chunkwise_forward(*prepared, eps, chunk_size, every, segmented)[:4]
        return h.to(out_dtype), (tuple(state) if output_final_state else None)
    h, state = _mlstm_chunkwise_loop(*prepared, eps, chunk_size, zero_start=initial_state is None,
                                     final_state=output_final_state, segmented=segmented)
    return h.to(out_dtype), state


def _state_dot(a, b):
    """sum(a * b) over the last two dimensions (B, NH, DK, DV) -> (B, NH). (As a batched (1, DK DV) x
    (DK DV, 1) matrix product, which einsum also makes of it, this was ~20x slower on CPU.)"""
    return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))


def _mlstm_chunk_backward(qc, kc, vc, ic, log_fc, hc, dhc, C, n, m, dC, dn, eps, above_diagonal, segmented=False):
    """The backward of `_mlstm_chunk` with the stabilisers held constant, recomputing the chunk's weights
    and scores from the state (C, n, m) carried into it: from dh of its outputs and dC, dn of the state
    it hands on, the gradients of qc, kc, vc, ic, log_fc and of the state carried in (dC, dn, dm)."""
    T_ = lambda x: x.transpose(-1, -2)  # noqa: E731
    b, seg = _log_gate_sums(log_fc, segmented)
    w, carry, stab = _chunk_weights(b, ic, m, above_diagonal, seg)
    scores, den, normaliser = _chunk_scores(qc, kc, n, w, carry, stab, eps)
    u, decay, _ = _chunk_end(b, ic, m, seg)
    kw = kc * u[..., None]
    # h = num / N, N = max(|den|, floor) + eps (torch.maximum splits a tie's gradient in halves)
    d_num = dhc / normaliser[..., None]
    floor = torch.exp(-stab)
    through = torch.where(den.abs() == floor, 0.5, (den.abs() > floor).to(den.dtype))
    d_den = -(dhc * hc).sum(-1) / normaliser * torch.sign(den) * through
    # num = S v + carry (q C), den = S 1 + carry (q . n), S = (q k^T) * w
    d_scores = d_num @ T_(vc) + d_den[..., None]
    d_qk = d_scores * w
    g_intra = d_scores * scores  # dL / d log D
    dq_carry = carry[..., None] * (d_num @ T_(C) + d_den[..., None] * n[..., None, :])
    # C' = decay C + (u k)^T v, n' = decay n + (u k)^T 1 (dC, dn: the gradients of C', n')
    d_kw = vc @ T_(dC) + dn[..., None, :]
    dq = d_qk @ kc + dq_carry
    dk = T_(d_qk) @ qc + d_kw * u[..., None]
    dv = T_(scores) @ d_num + kw @ dC
    # gates, through log D_ts = b_t - b_s + i_s, log carry_t = b_t + m, log u_s = b_L - b_s + i_s and
    # log decay = b_L + m
    g_carry = (dq_carry * qc).sum(-1)
    g_end = (d_kw * kw).sum(-1)
    g_decay = decay * (_state_dot(dC, C) + (dn * n).sum(-1))
    d_b = g_intra.sum(-1) - g_intra.sum(-2) + g_carry - g_end
    d_b[..., -1] += g_end.sum(-1) + g_decay
    di = g_intra.sum(-2) + g_end
    dlog_f = d_b.flip(-1).cumsum(-1).flip(-1)  # b = cumsum(log f)
    if segmented:  # a reset's log f (-inf) is a constant
        dlog_f = dlog_f.masked_fill(torch.isneginf(log_fc), 0.0)
    dm = g_carry.sum(-1) + g_decay
    # the gradient of the state carried in
    q_carry = qc * carry[..., None]
    dC = (T_(q_carry) @ d_num).addcmul_(dC, decay[..., None, None])
    dn = decay[..., None] * dn + (q_carry * d_den[..., None]).sum(-2)
    return dq, dk, dv, di, dlog_f, dC, dn, dm


class MLSTMChunkwiseFunction(torch.autograd.Function):
    """`_mlstm_chunkwise_loop` with a hand-written backward that keeps memory linear in T: the forward runs
    without autograd and saves the prepared inputs, h and the state carried into each chunk (or into every
    `state_every`-th chunk); the backward walks the chunks in reverse, recomputes each chunk's weights and
    scores from its state (the helpers above; with `state_every` > 1 first the states of a stretch of
    chunks from the saved one) and carries the state gradients (dC, dn) back across chunks. Stabilisers are
    constants, as in the reference; the gradient of the initial m is that of the first chunk's carry and decay.

    apply(q, k, v, i, log_f, C, n, m, eps, chunk_size, state_every, segmented=False) on prepared inputs
    -> h, C', n', m' (m' constant); `segmented`: log f holds resets (-inf).
    """

    @staticmethod
    def forward(ctx, q, k, v, i, log_f, C, n, m, eps, chunk_size, state_every, segmented=False):
        states = []
        h, (C, n, m) = _mlstm_chunkwise_loop(q, k, v, i, log_f, C, n, m, eps, chunk_size, states, state_every,
                                             segmented=segmented)
        ctx.save_for_backward(q, k, v, i, log_f, h, *(s for state in states for s in state))
        ctx.eps, ctx.chunk_size, ctx.state_every, ctx.segmented = eps, chunk_size, state_every, segmented
        ctx.mark_non_differentiable(m)
        return h, C, n, m

    @staticmethod
    @once_differentiable  # the backward is not itself differentiated (no double backward)
    def backward(ctx, dh, dC, dn, _dm):
        # (saved_tensors is unpacked once: non-reentrant activation checkpointing allows no second unpack)
        saved = ctx.saved_tensors
        with autocast_off(saved[0].device.type):
            return MLSTMChunkwiseFunction._backward(ctx, saved, dh, dC, dn)

    @staticmethod
    def _backward(ctx, saved_tensors, dh, dC, dn):
        q, k, v, i, log_f, h, *flat = saved_tensors
        saved = [flat[j:j + 3] for j in range(0, len(flat), 3)]
        return (*_mlstm_chunkwise_backward(q, k, v, i, log_f, h, saved, dh, dC, dn, ctx.eps, ctx.chunk_size,
                                           ctx.state_every, ctx.segmented), None, None, None, None)


def _mlstm_chunkwise_backward(q, k, v, i, log_f, h, saved, dh, dC, dn, eps, L, every, segmented=False):
    """The gradients (dq, dk, dv, di, dlog_f, dC, dn, dm) of the chunk loop from those of h and of the final
    (C, n) (None: zero), given `saved`, the states carried into every `every`-th chunk (see
    `MLSTMChunkwiseFunction`)."""
    T = q.shape[-2]
    chunks = lambda c: slice(c * L, min(T, (c + 1) * L))  # noqa: E731  (the positions of chunk c)
    dh = torch.zeros_like(h) if dh is None else dh
    dC = torch.zeros_like(saved[0][0]) if dC is None else dC
    dn = torch.zeros_like(saved[0][1]) if dn is None else dn
    dq, dk, dv, di, dlog_f = (torch.empty_like(t) for t in (q, k, v, i, log_f))
    above_diagonal = _above_diagonal(L, T, q.device)
    n_chunks = -(-T // L)
    for first in reversed(range(0, n_chunks, every)):
        # the states carried into chunks first .. last of this stretch, from the saved one
        states = [saved[first // every]]
        for c in range(first, min(first + every, n_chunks) - 1):
            b, seg = _log_gate_sums(log_f[..., chunks(c)], segmented)
            kc, vc, ic = k[..., chunks(c), :], v[..., chunks(c), :], i[..., chunks(c)]
            states.append(_chunk_advance(kc, vc, ic, b, *states[-1], seg=seg))
        for c in reversed(range(first, first + len(states))):
            rows = chunks(c)
            dq[..., rows, :], dk[..., rows, :], dv[..., rows, :], di[..., rows], dlog_f[..., rows], dC, dn, dm = \
                _mlstm_chunk_backward(*(t[..., rows, :] for t in (q, k, v)), i[..., rows], log_f[..., rows],
                                      h[..., rows, :], dh[..., rows, :], *states.pop(), dC, dn, eps,
                                      above_diagonal, segmented)
    return dq, dk, dv, di, dlog_f, dC, dn, dm


@float32_compute
def mlstm_one_chunk(q, k, v, i, f, initial_state=None, output_final_state=False, eps=1e-6, chunk_size=None,
                    resets=None):
    """`mlstm_chunkwise` (same signature and values) with the whole sequence as one chunk: the parallel form
    with a state in and out. No loop whose length depends on T, which is what torch.export needs for a
    sequence axis that stays dynamic; memory is quadratic in T (chunk_size unused)."""
    out_dtype = v.dtype
    q, k, v, i, log_f, C, n, m = _mlstm_prepare(q, k, v, i, f, initial_state, resets)
    if initial_state is None:
        C = n = None  # (the zero state: no carried terms)
    T = q.shape[-2]
    above_diagonal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    h, state = _mlstm_chunk(q, k, v, i, log_f, C, n, m, eps, above_diagonal, advance=output_final_state,
                            segmented=resets is not None)
    return h.to(out_dtype), (state if output_final_state else None)


@float32_compute
def mlstm_chunkwise_recompute(q, k, v, i, f, initial_state=None, output_final_state=False, eps=1e-6,
                              chunk_size=64, state_every=1, resets=None):
    """`mlstm_chunkwise` (same signature, function and gradients) whose backward recomputes each chunk from
    the state carried into it (`MLSTMChunkwiseFunction`), instead of autograd keeping every chunk's
    intermediates: training memory is the inputs plus one (C, n, m) per chunk. With `state_every` = K > 1
    only every K-th chunk's state is kept and the backward recomputes the others (one state update per
    chunk more, ~10% of the time): memory NC/K + K states rather than NC; None: K = ceil(sqrt(NC))."""
    if state_every is not None and (type(state_every) is not int or state_every < 1):
        raise ValueError(f"state_every must be a positive integer or None, got {state_every!r}")
    if torch.compiler.is_compiling():  # the operator, whose backward is this Function's (with K = 1: a K
        # that depends on T would compile a graph per sequence length)
        return mlstm_chunkwise(q, k, v, i, f, initial_state, output_final_state, eps, chunk_size, resets=resets)
    out_dtype = v.dtype
    prepared = _mlstm_prepare(q, k, v, i, f, initial_state, resets)
    segmented = resets is not None
    if torch.is_grad_enabled() and any(t.requires_grad for t in prepared):
        every = state_every or math.ceil(math.sqrt(-(-q.shape[-2] // chunk_size)))
        h, *state = MLSTMChunkwiseFunction.apply(*prepared, eps, chunk_size, every, segmented)
    else:  # nothing to differentiate: no states to keep
        h, state = _mlstm_chunkwise_loop(*prepared, eps, chunk_size, zero_start=initial_state is None,
                                         final_state=output_final_state, segmented=segmented)
    return h.to(out_dtype), (tuple(state) if output_final_state else None)


# The chunk loop as two custom operators (`torch.library`) for torch.compile: opaque to Dynamo, which would
# otherwise unroll the loop over ceil(T / chunk_size) chunks and so compile a graph per sequence length.
# The forward saves the state carried into every `state_every`-th chunk, stacked (S, ...); the backward is
# MLSTMChunkwiseFunction's. On prepared inputs (`_mlstm_prepare`), one dtype.
#
#     mlstm_chunkwise_forward(q, k, v, i, log_f, C, n, m, eps, chunk_size, state_every)
#         -> h, C', n', m', and the saved states Cs (S, B, NH, DK, DV), ns (S, B, NH, DK), ms (S, B, NH)


@torch.library.custom_op("xlstm_hf::mlstm_chunkwise_forward", mutates_args=())
def mlstm_chunkwise_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, log_f: torch.Tensor,
                            C: torch.Tensor, n: torch.Tensor, m: torch.Tensor, eps: float, chunk_size: int,
                            state_every: int, segmented: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        states = []
        h, (C, n, m) = _mlstm_chunkwise_loop(q, k, v, i, log_f, C, n, m, eps, chunk_size, states, state_every,
                                             segmented=segmented)
        Cs, ns, ms = (torch.stack(s) for s in zip(*states))
    return h, C, n, m, Cs, ns, ms


@mlstm_chunkwise_forward.register_fake
def _(q, k, v, i, log_f, C, n, m, eps, chunk_size, state_every, segmented=False):
    saved = -(-(-(-q.shape[-2] // chunk_size)) // state_every)  # ceil(ceil(T / L) / every)
    return (v.new_empty(v.shape), torch.empty_like(C), torch.empty_like(n), torch.empty_like(m),
            C.new_empty(saved, *C.shape), n.new_empty(saved, *n.shape), m.new_empty(saved, *m.shape))


@torch.library.custom_op("xlstm_hf::mlstm_chunkwise_backward", mutates_args=())
def mlstm_chunkwise_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor,
                             log_f: torch.Tensor, h: torch.Tensor, Cs: torch.Tensor, ns: torch.Tensor,
                             ms: torch.Tensor, dh: torch.Tensor, dC: torch.Tensor, dn: torch.Tensor, eps: float,
                             chunk_size: int, state_every: int, segmented: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (dq, dk, dv, di, dlog_f, dC, dn, dm) of `mlstm_chunkwise_forward`'s inputs."""
    with autocast_off(q.device.type):
        saved = list(zip(Cs.unbind(0), ns.unbind(0), ms.unbind(0)))
        return _mlstm_chunkwise_backward(q, k, v, i, log_f, h, saved, dh, dC, dn, eps, chunk_size, state_every,
                                         segmented)


@mlstm_chunkwise_backward.register_fake
def _(q, k, v, i, log_f, h, Cs, ns, ms, dh, dC, dn, eps, chunk_size, state_every, segmented=False):
    return (*(torch.empty_like(t) for t in (q, k, v, i, log_f)), torch.empty_like(Cs[0]), torch.empty_like(ns[0]),
            torch.empty_like(ms[0]))


def _chunkwise_setup_context(ctx, inputs, output):
    q, k, v, i, log_f, _, _, _, eps, chunk_size, state_every, segmented = inputs
    ctx.save_for_backward(q, k, v, i, log_f, output[0], *output[4:])
    ctx.options = eps, chunk_size, state_every, segmented
    ctx.mark_non_differentiable(*output[3:])  # the final m (a constant, as in the reference), the saved states


def _chunkwise_backward(ctx, dh, dC, dn, *_):
    q, k, v, i, log_f, h, Cs, ns, ms = ctx.saved_tensors
    dh = torch.zeros_like(h) if dh is None else dh
    dC = torch.zeros_like(Cs[0]) if dC is None else dC
    dn = torch.zeros_like(ns[0]) if dn is None else dn
    grads = torch.ops.xlstm_hf.mlstm_chunkwise_backward(q, k, v, i, log_f, h, Cs, ns, ms, dh, dC, dn, *ctx.options)
    return (*grads, None, None, None, None)


mlstm_chunkwise_forward.register_autograd(_chunkwise_backward, setup_context=_chunkwise_setup_context)


@float32_compute
def mlstm_step(q, k, v, i, f, state: MLSTMState, eps=1e-6, fused_update=None):
    """One mLSTM step (the decode path). q, k: (B, NH, DK); v: (B, NH, DV); i, f: (B, NH).

    Returns (h (B, NH, DV) in the compute dtype, new state). The state is handed over: without autograd
    its C is updated in place when it already has the compute dtype (decoding: C is the largest tensor
    the model touches per token, and the cache owns it). `fused_update(C, q, gain_k, v, decay)`, if
    given, may do that in-place update and return the read-out q^T C' in one pass (a fused kernel, see
    backends.py), or return None where it cannot.
    """
    q, k, v, i, f = _up(q, k, v, i, f)
    C, n, m = (s.to(q.dtype) for s in state)
    k = k / math.sqrt(k.shape[-1])
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i).detach()
    m_new0 = _finite(m_new)
    decay = torch.exp(log_f + m - m_new0)
    gain_k = torch.exp(i - m_new0)[..., None] * k
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (C, q, k, v, i, f)))
    numerator = None if fused_update is None or not in_place else fused_update(C, q, gain_k, v, decay)
    if numerator is None:
        # q^T C_t = decay q^T C_{t-1} + (q . gain k) v: read the old C once instead of the new one
        numerator = decay[..., None] * (q[..., None, :] @ C).squeeze(-2) + (q * gain_k).sum(-1, keepdim=True) * v
        if in_place:  # two passes over C in place, no C-sized temporaries (C is the state's own or a converted copy)
            C = C.mul_(decay[..., None, None]).addcmul_(gain_k[..., :, None], v[..., None, :])
        else:
            C = decay[..., None, None] * C + gain_k[..., :, None] * v[..., None, :]
    n = decay[..., None] * n + gain_k
    normaliser = torch.maximum((q * n).sum(-1).abs(), torch.exp(-m_new)) + eps
    return numerator / normaliser[..., None], (C, n, m_new)


@float32_compute
def mlstm_recurrent(q, k, v, i, f, initial_state=None, output_final_state=False, eps=1e-6, chunk_size=None,
                    resets=None):
    """mLSTM over a sequence one step at a time (shapes and resets as `mlstm_chunkwise`; chunk_size unused)."""
    B, NH, T, DK = q.shape
    if resets is not None:  # a reset is a forget gate of exactly zero: log sigmoid(-inf) = -inf
        f = f.masked_fill(check_resets(resets, B, T)[:, None, :], float("-inf"))
    # the steps update their state in place: never the caller's
    state = tuple(t.clone() for t in initial_state) if initial_state is not None else \
        mlstm_zero_state(B, NH, DK, v.shape[-1], q.device)
    outputs = []
    for q_t, k_t, v_t, i_t, f_t in zip(*(x.unbind(-2) for x in (q, k, v)), *(x.unbind(-1) for x in (i, f))):
        h, state = mlstm_step(q_t, k_t, v_t, i_t, f_t, state, eps=eps)
        outputs.append(h)
    return torch.stack(outputs, dim=-2).to(v.dtype), (state if output_final_state else None)


#: the forms of the mLSTM cell, by name (all with the signature of `mlstm_chunkwise`)
MLSTM_FORMS = {"parallel": mlstm_parallel, "chunkwise": mlstm_chunkwise, "recurrent": mlstm_recurrent}


def slstm_zero_state(batch: int, heads: int, dh: int, device=None, dtype=torch.float32) -> SLSTMState:
    """The empty sLSTM state: h = c = n = 0, m = -inf."""
    zeros = torch.zeros(batch, heads, dh, device=device, dtype=dtype)
    return zeros, zeros.clone(), zeros.clone(), torch.full_like(zeros, float("-inf"))


def slstm_pointwise(raw, c, n, m):
    """One sLSTM step after the recurrent matmul: raw (..., 4, DH) gate pre-activations (i, f, z, o) and the
    previous c, n, m (..., DH). Returns the new (h, c, n, m)."""
    i_raw, f_raw, z_raw, o_raw = raw.unbind(-2)
    log_f_m = m + F.logsigmoid(f_raw)
    m_new = torch.maximum(i_raw, log_f_m).detach()
    i_gate = torch.exp(i_raw - m_new)
    f_gate = torch.exp(log_f_m - m_new)
    c_new = f_gate * c + i_gate * torch.tanh(z_raw)
    n_new = f_gate * n + i_gate
    h_new = torch.sigmoid(o_raw) * c_new / n_new
    return h_new, c_new, n_new, m_new


@float32_compute
def slstm_recurrent(x, recurrent_kernel, bias, initial_state=None, output_final_state=False, mask=None, resets=None):
    """sLSTM over a sequence (paper eqs. 8-17, stabilised as in the official package).

    x: (B, T, NH, 4, DH) input contributions to the gate pre-activations, gates ordered (i, f, z, o);
    recurrent_kernel: (NH, DH, 4, DH) maps h_{t-1} of a head (input dim) to that head's four gates;
    bias: (NH, 4, DH); mask: optional (B, T) bool, False = padding: that step leaves the state unchanged;
    resets: optional (B, T) bool, True where a new sequence starts (packed documents): the state carried
    into that step is replaced by the zero state (h = c = n = 0, m = -inf). Returns (h (B, T, NH, DH), final
    state (h, c, n, m) each (B, NH, DH) or None).

        i~, f~, z~, o~ = x_t + R h_{t-1} + b
        m_t = max(log sigmoid(f~) + m_{t-1}, i~);  i = exp(i~ - m_t);  f = exp(log sigmoid(f~) + m_{t-1} - m_t)
        c_t = f c_{t-1} + i tanh(z~);  n_t = f n_{t-1} + i;  h_t = sigmoid(o~) c_t / n_t
    """
    out_dtype = x.dtype
    B, T, NH, G, DH = x.shape
    # Time-major, head-major layout so that each step is one batched matmul over heads: (T, NH, B, 4, DH)
    x, bias, recurrent_kernel = _up(x, bias, recurrent_kernel)
    wx = (x + bias).permute(1, 2, 0, 3, 4)
    r = recurrent_kernel.reshape(NH, DH, G * DH)
    state = initial_state if initial_state is not None else slstm_zero_state(B, NH, DH, x.device)
    h, c, n, m = (s.to(x.dtype).transpose(0, 1) for s in state)  # each (NH, B, DH)
    keeps = None if mask is None else mask.T[:, None, :, None]  # (T, 1, B, 1)
    starts = None if resets is None else check_resets(resets, B, T).T[:, None, :, None]

    def step(state, wx_t, keep, start):
        h, c, n, m = state
        if start is not None:  # a new document: it starts from the zero state
            h, c, n = (torch.where(start, 0.0, s) for s in (h, c, n))
            m = torch.where(start, float("-inf"), m)
        new = slstm_pointwise(wx_t + torch.bmm(h, r).view(NH, B, G, DH), c, n, m)
        return new if keep is None else tuple(torch.where(keep, a, b) for a, b in zip(new, (h, c, n, m)))

    if isinstance(T, torch.SymInt):
        # a sequence axis that stays dynamic (torch.export): the steps as one `scan`, whose length stays
        # symbolic where a loop would be unrolled for the example's T; padding and resets as (T, 1, B, 1) masks
        keeps = torch.ones(T, 1, B, 1, dtype=torch.bool, device=x.device) if keeps is None else keeps
        starts = torch.zeros(T, 1, B, 1, dtype=torch.bool, device=x.device) if starts is None else starts

        def combine(state, xs):  # (the scan needs one layout for the state it carries: contiguous)
            new = tuple(t.contiguous() for t in step(state, *xs))
            return new, new[0].clone()

        (h, c, n, m), out = scan(combine, tuple(t.contiguous() for t in (h, c, n, m)), (wx, keeps, starts))
    else:
        outputs = []
        # unbind() rather than wx[t]: indexing in the loop would give each step a full-size zero gradient
        for t, wx_t in enumerate(wx.unbind(0)):
            h, c, n, m = step((h, c, n, m), wx_t, None if keeps is None else keeps[t], None if starts is None else starts[t])
            outputs.append(h)
        out = torch.stack(outputs, dim=0)
    out = out.permute(2, 0, 1, 3).to(out_dtype)  # (B, T, NH, DH)
    final = tuple(s.transpose(0, 1) for s in (h, c, n, m)) if output_final_state else None
    return out, final


# Packed rows for the sequential sLSTM. A row of packed documents is a chain of T steps, so B = 1 rows of
# N tokens (DataCollatorWithFlattening) would be N sequential steps of one row each. Laid out as one
# document per row, right-padded, the same work takes as many steps as the longest document, and every
# backend runs it unchanged: its padding mask (a padded step keeps the state) and initial states do the
# rest. Documents are grouped by length (lengths in (2^(k-1), 2^k] share a group, padded to its longest),
# so that one long document does not pad every short one to its length: padded steps stay below the real
# ones, and the groups' steps add up to less than twice the longest document.


def documents_as_rows(resets: torch.Tensor, mask: torch.Tensor | None):
    """The layout of packed rows with one document per row, in groups of similar length: resets (B, T)
    bool, True where a document starts (a row's first position always starts one); mask (B, T) bool or
    None, False = padding. Reads the documents' lengths on the host.

    Returns (groups, scatter, first, last). groups: for each group, (docs (D_g,) long, gather (D_g, L_g)
    long, valid (D_g, L_g) bool): the group's documents, and step l of its row d is flat token gather[d, l]
    of (B * T) where valid. scatter (B * T,) long: token j is entry scatter[j] of the groups' outputs
    (D_g * L_g each) concatenated in order. first (D,) long: the row whose initial state document d
    continues, or -1 (a reset, or not a row's first document: it starts from zero). last (B,) long: the
    document whose final state is row b's, as an index into the groups' documents concatenated."""
    B, T = resets.shape
    device = resets.device
    starts = resets.clone()
    starts[:, 0] = True
    flat = starts.reshape(-1)
    doc = flat.cumsum(0) - 1  # (B * T,) each token's document
    begin = torch.nonzero(flat).squeeze(1)  # (D,) each document's first flat token
    lengths = torch.diff(begin, append=begin.new_tensor([B * T]))
    bucket = torch.ceil(torch.log2(lengths.double())).long()
    groups, entry, slot, base, count = [], torch.empty_like(begin), torch.empty_like(begin), 0, 0
    for k in torch.unique(bucket).tolist():
        docs = torch.nonzero(bucket == k).squeeze(1)
        L = int(lengths[docs].max())
        steps = torch.arange(L, device=device)
        gather = (begin[docs, None] + steps).clamp_max(B * T - 1)
        valid = steps < lengths[docs, None]
        if mask is not None:
            valid = valid & mask.reshape(-1)[gather]
        groups.append((docs, gather, valid))
        entry[docs] = base + torch.arange(len(docs), device=device) * L
        slot[docs] = count + torch.arange(len(docs), device=device)
        base, count = base + len(docs) * L, count + len(docs)
    scatter = entry[doc] + torch.arange(B * T, device=device) - begin[doc]
    first = torch.where(resets.reshape(-1)[begin], -1, begin // T)  # a row's first document, unless it resets
    last = slot[doc[torch.arange(B, device=device) * T + T - 1]]
    return groups, scatter, first, last


def slstm_by_document(slstm, x, recurrent_kernel, bias, initial_state=None, output_final_state=False, mask=None,
                      resets=None):
    """`slstm(x, recurrent_kernel, bias, initial_state, output_final_state, mask)` (any backend's sLSTM, the
    signature of `slstm_recurrent`) on packed rows with `resets` (B, T) bool: the same function as
    `slstm_recurrent(..., resets=resets)`, computed one document per row (`documents_as_rows`). A row's
    first document continues the row's initial state (unless it is reset too); the final state of a row is
    that of its last document."""
    B, T, NH, G, DH = x.shape
    groups, scatter, first, last = documents_as_rows(check_resets(resets, B, T), mask)
    flat_x = x.reshape(B * T, NH, G, DH)
    outputs, finals = [], []
    for docs, gather, valid in groups:
        D, L = gather.shape
        state = None
        if initial_state is not None:
            row = first[docs]
            zero = slstm_zero_state(1, NH, DH, x.device, initial_state[0].dtype)
            state = tuple(torch.where((row >= 0)[:, None, None], s[row.clamp_min(0)], z)
                          for s, z in zip(initial_state, zero))
        h, final = slstm(flat_x[gather.reshape(-1)].view(D, L, NH, G, DH), recurrent_kernel, bias, state,
                         output_final_state, valid)
        outputs.append(h.reshape(D * L, NH, DH))
        finals.append(final)
    out = torch.cat(outputs)[scatter].view(B, T, NH, DH)
    if not output_final_state:
        return out, None
    return out, tuple(torch.cat(parts)[last] for parts in zip(*finals))
