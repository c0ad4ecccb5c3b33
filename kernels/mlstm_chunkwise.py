"""Chunkwise mLSTM in Triton (forward and backward): the parallel form inside chunks, a recurrence across them.

The reference is `xlstm_hf.cells.mlstm_chunkwise`; this computes the same function and the same gradients
(stabilisers are autograd constants), with the same chunk boundaries for chunk sizes in CHUNK_SIZES.

Per (batch, head) and chunk of L positions t, s, with the state (C, n, m) carried into the chunk,
b_t = sum of log sigmoid(f~) over the chunk up to t, k already scaled by 1/sqrt(DK):

    log D_ts = b_t - b_s + i~_s (s <= t)            stab_t = max(max_s log D_ts, b_t + m)   (stab0: -inf -> 0)
    S_ts = (q_t . k_s) exp(log D_ts - stab0_t)       carry_t = exp(b_t + m - stab0_t)
    h_t = (S v + carry C^T q)_t / (max(|(S 1 + carry n . q)_t|, exp(-stab_t)) + eps)
    m' = max(b_L + m, max_s (b_L - b_s + i~_s));     u_s = exp(b_L - b_s + i~_s - m'0);   decay = exp(b_L + m - m'0)
    C' = decay C + sum_s u_s k_s v_s^T                n' = decay n + sum_s u_s k_s

Design (four kernels, all fp32 inside whatever the input dtype; DK and DV are tiled by BLOCK_K x BLOCK_V, so the
head dims are limited only by memory):

forward
  A `_chunk_states_kernel`   grid (B*NH, DK tiles, DV tiles): walks over the chunks in order and writes the
                             state at every chunk boundary, C_c, n_c, m_c for c = 0..NC (c = 0 the initial
                             state, c = NC the final one). Only this loop is sequential.
  B `_chunk_outputs_kernel`  grid (B*NH, NC, DV tiles): every chunk in parallel, from its boundary state; stores
                             h in fp32 and, for the backward, the denominator den_t and stabiliser stab_t.
backward (with the stabilisers held fixed; torch glue turns dh into dnum = dh / N and dden, N the normaliser)
  C `_chunk_state_grads_kernel` grid (B*NH, DK tiles, DV tiles): the reverse recurrence for the gradient of
                             the boundary states, dC_c = decay_c dC_{c+1} + sum_t carry_t q_t dnum_t^T (and dn_c
                             likewise), starting from the gradient of the final state.
  D `_chunk_grads_kernel`    grid (B*NH, NC): per chunk, dq, dk, dv from the intra-chunk scores, the carried
                             state C_c, n_c and the gradient dC_{c+1}, dn_{c+1} of the state it hands on; and
                             the gate gradients: d b_t collected from every place b enters, then d log f =
                             reverse cumulative sum of d b within the chunk.

Quantities that are cheap to recompute (b, log D, stab, carry, u, decay, m_{c+1}) are recomputed in every
kernel by the same helpers, so they agree bit for bit with the forward pass; only the boundary states (NC+1
matrices per head, as in any chunkwise kernel), h, den and stab are stored (kernel C takes carry from the
stored stab, to keep L x L work out of its sequential loop). The log-gate differences b_t - b_s and
b_L - b_s are summed directly (segment sums, by reverse scans) rather than subtracted, which keeps them
accurate when b is large (long chunks, extreme gates).

Packed documents (resets) need nothing of their own: a document start is a forget gate of exactly zero,
f~ = -inf, so log f = -inf there, and every log-gate sum that crosses it is -inf (the sums are never
subtracted, so no -inf - -inf arises): the weights of earlier tokens, the carry of the state into later
tokens and the decay of the state over the chunk are exactly zero, and their gradients too. The gradient
of that f~ is dropped by the masked_fill in the wrapper.

A sequence that is not a multiple of the chunk is padded inside the kernels by masked loads: i~ = -inf
(the padded token is never written into the state) and log f = 0 (the state passes through unchanged), so
the last chunk's state is the state after the last real token. Sequences no longer than one chunk use a
single chunk of the next power of two >= 16 (the same single chunk as the reference, less padding).

Matmul precision (kernels/common.py): bf16/fp16 inputs take tensor-core products (operands rounded to the input
dtype: q, k, v, the scores, the states' tiles; fp32 accumulation); fp32 inputs exact fp32 ("ieee"; TF32 only
when asked for with torch.set_float32_matmul_precision). States, gates and normalisers are always fp32.
"""

import math

import torch
import triton
import triton.language as tl

from xlstm_hf.cells import check_resets

from .common import dot_precision, launch, mma

_NEG_INF = tl.constexpr(float("-inf"))  # usable inside @triton.jit functions

#: chunk sizes the kernels use (powers of two; tl.dot needs >= 16, larger chunks need too many registers);
#: another requested size is rounded to the nearest of these, which changes the work split, not the result
CHUNK_SIZES = (16, 32, 64, 128)
#: the largest DK / DV tile; heads wider than this are processed in several tiles
MAX_BLOCK = 64


# ----------------------------------------------------------------------------------------------------------
# small helpers (inlined by Triton)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _log1p(x):
    # log(1 + x) to full relative precision for small x >= 0 (tl has no log1p on every backend):
    # u = fl(1 + x) and x / (u - 1) corrects log(u) for the rounding of 1 + x (Goldberg's trick)
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _log_sigmoid(x):
    # log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)): no overflow for large |x|, and accurate for
    # open forget gates (x >> 0), whose log f are small and summed over the chunk
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _finite(m):
    """The stabiliser to subtract: m, or 0 where m = -inf (nothing seen yet), which keeps exp() finite."""
    return tl.where(m == _NEG_INF, 0.0, m)


@triton.jit
def _load_rows(base, t, t_ok, d0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows t and columns d0 .. d0+BLOCK_D of a row-major (T, D) matrix, in fp32; zero outside."""
    d = d0 + tl.arange(0, BLOCK_D)
    mask = t_ok[:, None] & (d < D)[None, :]
    return tl.load(base + t[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(base, x, t, t_ok, d0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    d = d0 + tl.arange(0, BLOCK_D)
    mask = t_ok[:, None] & (d < D)[None, :]
    tl.store(base + t[:, None] * D + d[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _load_tile(base, k0, v0, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """The (BLOCK_K, BLOCK_V) tile at (k0, v0) of a row-major (DK, DV) state matrix; zero outside."""
    rk = k0 + tl.arange(0, BLOCK_K)
    rv = v0 + tl.arange(0, BLOCK_V)
    mask = (rk < DK)[:, None] & (rv < DV)[None, :]
    return tl.load(base + rk[:, None] * DV + rv[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, x, k0, v0, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    rk = k0 + tl.arange(0, BLOCK_K)
    rv = v0 + tl.arange(0, BLOCK_V)
    mask = (rk < DK)[:, None] & (rv < DV)[None, :]
    tl.store(base + rk[:, None] * DV + rv[None, :], x, mask=mask)


@triton.jit
def _load_vec(base, d0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    d = d0 + tl.arange(0, BLOCK_D)
    return tl.load(base + d, mask=d < D, other=0.0)


@triton.jit
def _store_vec(base, x, d0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    d = d0 + tl.arange(0, BLOCK_D)
    tl.store(base + d, x, mask=d < D)


@triton.jit
def _chunk_gates(I, F, c, T, L: tl.constexpr):
    """Positions of chunk c and its gates: (t, t_ok, i~, f~, b, b_L, log_f_next). I, F: this head's (T,) rows.

    b_t = sum_{j <= t} log f_j within the chunk; log_f_next[j] = log f_{j+1} (0 past the chunk's end).
    Padded positions (t >= T) get i~ = -inf and log f = 0, so they neither enter nor change the state.
    """
    j = tl.arange(0, L)
    t = c * L + j
    t_ok = t < T
    i = tl.load(I + t, mask=t_ok, other=_NEG_INF).to(tl.float32)
    f = tl.load(F + t, mask=t_ok, other=0.0).to(tl.float32)
    log_f = tl.where(t_ok, _log_sigmoid(f), 0.0)
    next_ok = (t + 1 < T) & (j + 1 < L)
    f_next = tl.load(F + t + 1, mask=next_ok, other=0.0).to(tl.float32)
    log_f_next = tl.where(next_ok, _log_sigmoid(f_next), 0.0)
    b = tl.cumsum(log_f, axis=0)
    b_last = tl.sum(tl.where(j == L - 1, b, 0.0), axis=0)  # exactly b[L-1], as the reference
    return t, t_ok, i, f, b, b_last, log_f_next


# The differences b_t - b_s (s <= t) are summed directly, sum_{s < j <= t} log f_j, rather than subtracted:
# b_t and b_s can be large (tens, for a long chunk of half-open gates) while their difference is small, and
# a parallel scan rounds b_t and b_s independently, so the subtraction would keep an error of ~ulp(b).


@triton.jit
def _chunk_weights(b, i, log_f_next, m, L: tl.constexpr):
    """Intra-chunk weights exp(log D - stab0) (zero above the diagonal), carry weights, and stab (with -inf)."""
    pos = tl.arange(0, L)
    causal = pos[:, None] >= pos[None, :]
    # row t: sum over j in [s, t) of log f_{j+1} = b_t - b_s, by a reverse scan along the row
    b_diff = tl.cumsum(tl.where(pos[None, :] < pos[:, None], log_f_next[None, :], 0.0), axis=1, reverse=True)
    log_d = tl.where(causal, b_diff + i[None, :], _NEG_INF)
    log_carry = b + m
    stab = tl.maximum(tl.max(log_d, axis=1), log_carry)
    stab0 = _finite(stab)
    return tl.exp(log_d - stab0[:, None]), tl.exp(log_carry - stab0), stab


@triton.jit
def _chunk_end(b_last, i, log_f_next, m):
    """Weights that advance the state over the chunk: (u_s, decay, m')."""
    log_w = tl.cumsum(log_f_next, axis=0, reverse=True) + i  # b_L - b_s + i~_s
    m_next = tl.maximum(b_last + m, tl.max(log_w, axis=0))
    m_next0 = _finite(m_next)
    return tl.exp(log_w - m_next0), tl.exp(b_last + m - m_next0), m_next


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_states_kernel(
    K, V, I, F,  # (B*NH, T, DK), (B*NH, T, DV), (B*NH, T), (B*NH, T)
    CS, NS, MS,  # boundary states, fp32: (B*NH, NC+1, DK, DV), (B*NH, NC+1, DK), (B*NH, NC+1); index 0 filled in
    scale, T, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    v0 = tl.program_id(2) * BLOCK_V
    # n and m do not depend on the DV tile: the first DV tile writes them (m: the first tile of all)
    writes_n = tl.program_id(2) == 0
    writes_m = writes_n & (tl.program_id(1) == 0)
    k_base = K + bh * T * DK
    v_base = V + bh * T * DV
    c_base = CS + bh * (NC + 1) * DK * DV
    n_base = NS + bh * (NC + 1) * DK
    m_base = MS + bh * (NC + 1)

    C = _load_tile(c_base, k0, v0, DK, DV, BLOCK_K, BLOCK_V)
    n = _load_vec(n_base, k0, DK, BLOCK_K)
    m = tl.load(m_base)
    for c in range(NC):
        t, t_ok, i, _, _, b_last, log_f_next = _chunk_gates(I + bh * T, F + bh * T, c, T, L)
        u, decay, m = _chunk_end(b_last, i, log_f_next, m)
        ku = _load_rows(k_base, t, t_ok, k0, DK, BLOCK_K) * (scale * u)[:, None]
        v = _load_rows(v_base, t, t_ok, v0, DV, BLOCK_V)
        C = decay * C + mma(tl.trans(ku), v, DOT_DTYPE, PRECISION)
        n = decay * n + tl.sum(ku, axis=0)
        _store_tile(c_base + (c + 1) * DK * DV, C, k0, v0, DK, DV, BLOCK_K, BLOCK_V)
        if writes_n:
            _store_vec(n_base + (c + 1) * DK, n, k0, DK, BLOCK_K)
        if writes_m:
            tl.store(m_base + c + 1, m)


@triton.jit
def _chunk_outputs_kernel(
    Q, K, V, I, F, CS, NS, MS,
    H, DEN, STAB,  # outputs, fp32: h (B*NH, T, DV); den_t and stab_t (B*NH, T) for the backward
    scale, eps, T, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    v0 = tl.program_id(2) * BLOCK_V
    q_base = Q + bh * T * DK
    k_base = K + bh * T * DK
    state = bh * (NC + 1) + c  # index of the state carried into this chunk
    t, t_ok, i, _, b, _, log_f_next = _chunk_gates(I + bh * T, F + bh * T, c, T, L)
    w, carry, stab = _chunk_weights(b, i, log_f_next, tl.load(MS + state), L)

    # contractions over DK, one tile at a time: q k^T (L, L), q^T C (L, BLOCK_V), q . n (L,)
    qk = tl.zeros((L, L), dtype=tl.float32)
    qc = tl.zeros((L, BLOCK_V), dtype=tl.float32)
    qn = tl.zeros((L,), dtype=tl.float32)
    for k0 in range(0, DK, BLOCK_K):
        q = _load_rows(q_base, t, t_ok, k0, DK, BLOCK_K)
        k = _load_rows(k_base, t, t_ok, k0, DK, BLOCK_K) * scale
        qk += mma(q, tl.trans(k), DOT_DTYPE, PRECISION)
        qc += mma(q, _load_tile(CS + state * DK * DV, k0, v0, DK, DV, BLOCK_K, BLOCK_V), DOT_DTYPE, PRECISION)
        qn += tl.sum(q * _load_vec(NS + state * DK, k0, DK, BLOCK_K)[None, :], axis=1)

    scores = qk * w
    v = _load_rows(V + bh * T * DV, t, t_ok, v0, DV, BLOCK_V)
    num = mma(scores, v, DOT_DTYPE, PRECISION) + carry[:, None] * qc
    den = tl.sum(scores, axis=1) + carry * qn
    h = num / (tl.maximum(tl.abs(den), tl.exp(-stab)) + eps)[:, None]
    _store_rows(H + bh * T * DV, h, t, t_ok, v0, DV, BLOCK_V)
    if tl.program_id(2) == 0:  # den and stab do not depend on the DV tile
        tl.store(DEN + bh * T + t, den, mask=t_ok)
        tl.store(STAB + bh * T + t, stab, mask=t_ok)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_state_grads_kernel(
    Q, I, F, MS, STAB, DNUM, DDEN,  # DNUM (B*NH, T, DV), DDEN (B*NH, T): gradients of numerator, denominator
    DCS, DNS,  # gradients of the boundary states, fp32 (B*NH, NC+1, DK, DV), (B*NH, NC+1, DK); index NC filled in
    T, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    v0 = tl.program_id(2) * BLOCK_V
    writes_n = tl.program_id(2) == 0
    dc_base = DCS + bh * (NC + 1) * DK * DV
    dn_base = DNS + bh * (NC + 1) * DK

    dC = _load_tile(dc_base + NC * DK * DV, k0, v0, DK, DV, BLOCK_K, BLOCK_V)
    dn = _load_vec(dn_base + NC * DK, k0, DK, BLOCK_K)
    for j in range(NC):
        c = NC - 1 - j
        t, t_ok, i, _, b, b_last, log_f_next = _chunk_gates(I + bh * T, F + bh * T, c, T, L)
        m = tl.load(MS + bh * (NC + 1) + c)
        _, decay, _ = _chunk_end(b_last, i, log_f_next, m)
        # carry_t as in the forward, from its stored stabiliser (no L x L work in this sequential loop);
        # padded rows have no stab: zero them (their dnum, dden are zero, and exp could overflow there)
        stab0 = _finite(tl.load(STAB + bh * T + t, mask=t_ok, other=0.0))
        carry = tl.where(t_ok, tl.exp(b + m - stab0), 0.0)
        # C_c reaches the outputs of chunk c through carry_t q_t^T C_c, and the next state through decay C_c
        q_carry = _load_rows(Q + bh * T * DK, t, t_ok, k0, DK, BLOCK_K) * carry[:, None]
        dnum = _load_rows(DNUM + bh * T * DV, t, t_ok, v0, DV, BLOCK_V)
        dden = tl.load(DDEN + bh * T + t, mask=t_ok, other=0.0)
        dC = decay * dC + mma(tl.trans(q_carry), dnum, DOT_DTYPE, PRECISION)
        dn = decay * dn + tl.sum(q_carry * dden[:, None], axis=0)
        _store_tile(dc_base + c * DK * DV, dC, k0, v0, DK, DV, BLOCK_K, BLOCK_V)
        if writes_n:
            _store_vec(dn_base + c * DK, dn, k0, DK, BLOCK_K)


@triton.jit
def _chunk_grads_kernel(
    Q, K, V, I, F, CS, NS, MS, DNUM, DDEN, DCS, DNS,
    DQ, DK_, DV_, DI, DF,  # gradients of the inputs, fp32, shaped as the inputs
    scale, T, NC,
    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    q_base = Q + bh * T * DK
    k_base = K + bh * T * DK
    v_base = V + bh * T * DV
    dnum_base = DNUM + bh * T * DV
    state = bh * (NC + 1) + c  # C_c, n_c: the state carried in; dC_{c+1}, dn_{c+1}: the gradient of the one handed on
    c_in = CS + state * DK * DV
    n_in = NS + state * DK
    dc_out = DCS + (state + 1) * DK * DV
    dn_out = DNS + (state + 1) * DK

    t, t_ok, i, f, b, b_last, log_f_next = _chunk_gates(I + bh * T, F + bh * T, c, T, L)
    m = tl.load(MS + state)
    w, carry, _ = _chunk_weights(b, i, log_f_next, m, L)
    u, decay, _ = _chunk_end(b_last, i, log_f_next, m)
    dden = tl.load(DDEN + bh * T + t, mask=t_ok, other=0.0)

    # intra-chunk part: scores S = (q k^T) * w, and dS_w = dL/dS = dnum v^T + dden 1^T
    qk = tl.zeros((L, L), dtype=tl.float32)
    for k0 in range(0, DK, BLOCK_K):
        q = _load_rows(q_base, t, t_ok, k0, DK, BLOCK_K)
        k = _load_rows(k_base, t, t_ok, k0, DK, BLOCK_K) * scale
        qk += mma(q, tl.trans(k), DOT_DTYPE, PRECISION)
    d_scores = tl.zeros((L, L), dtype=tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        dnum = _load_rows(dnum_base, t, t_ok, v0, DV, BLOCK_V)
        v = _load_rows(v_base, t, t_ok, v0, DV, BLOCK_V)
        d_scores += mma(dnum, tl.trans(v), DOT_DTYPE, PRECISION)
    d_scores += dden[:, None]
    scores = qk * w
    d_qk = d_scores * w  # zero above the diagonal, as w
    # log D_ts = b_t - b_s + i~_s enters S_ts = qk_ts exp(log D_ts - stab0_t): dL/dlog D = dS_w * S
    g_intra = d_scores * scores
    g_cols = tl.sum(g_intra, axis=0)
    d_b = tl.sum(g_intra, axis=1) - g_cols
    d_i = g_cols

    # dq, dk, one DK tile at a time; the carry and end-of-chunk terms need C_c and dC_{c+1} over all of DV
    g_end = tl.zeros((L,), dtype=tl.float32)  # g_s = u_s k_s . (dC' v_s + dn'): dL/dlog w_s
    d_decay = tl.zeros((BLOCK_K,), dtype=tl.float32)  # summed to <dC', C> + <dn', n>
    for k0 in range(0, DK, BLOCK_K):
        q = _load_rows(q_base, t, t_ok, k0, DK, BLOCK_K)
        k = _load_rows(k_base, t, t_ok, k0, DK, BLOCK_K) * scale
        n = _load_vec(n_in, k0, DK, BLOCK_K)
        dn = _load_vec(dn_out, k0, DK, BLOCK_K)
        dnum_ct = tl.zeros((L, BLOCK_K), dtype=tl.float32)  # dnum C_c^T
        v_dct = tl.zeros((L, BLOCK_K), dtype=tl.float32)  # v dC'^T
        for v0 in range(0, DV, BLOCK_V):
            dnum = _load_rows(dnum_base, t, t_ok, v0, DV, BLOCK_V)
            v = _load_rows(v_base, t, t_ok, v0, DV, BLOCK_V)
            C = _load_tile(c_in, k0, v0, DK, DV, BLOCK_K, BLOCK_V)
            dC = _load_tile(dc_out, k0, v0, DK, DV, BLOCK_K, BLOCK_V)
            dnum_ct += mma(dnum, tl.trans(C), DOT_DTYPE, PRECISION)
            v_dct += mma(v, tl.trans(dC), DOT_DTYPE, PRECISION)
            d_decay += tl.sum(dC * C, axis=1)
        d_decay += dn * n
        dq_carry = carry[:, None] * (dnum_ct + dden[:, None] * n[None, :])
        dk_end = u[:, None] * (v_dct + dn[None, :])
        # carry_t = exp(b_t + m - stab0_t) and u_s = exp(b_L - b_s + i~_s - m'0): their log-gradients are
        # (contribution to dq_t) . q_t and (contribution to dk_s) . k_s
        d_b += tl.sum(dq_carry * q, axis=1)
        g_end += tl.sum(dk_end * k, axis=1)
        dq = mma(d_qk, k, DOT_DTYPE, PRECISION) + dq_carry
        dk = mma(tl.trans(d_qk), q, DOT_DTYPE, PRECISION) + dk_end
        _store_rows(DQ + bh * T * DK, dq, t, t_ok, k0, DK, BLOCK_K)
        _store_rows(DK_ + bh * T * DK, dk * scale, t, t_ok, k0, DK, BLOCK_K)  # k was scaled by `scale`

    # dv, one DV tile at a time: from the outputs (S^T dnum) and from the state handed on (u_s dC'^T k_s)
    for v0 in range(0, DV, BLOCK_V):
        dnum = _load_rows(dnum_base, t, t_ok, v0, DV, BLOCK_V)
        k_dc = tl.zeros((L, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, DK, BLOCK_K):
            k = _load_rows(k_base, t, t_ok, k0, DK, BLOCK_K) * scale
            k_dc += mma(k, _load_tile(dc_out, k0, v0, DK, DV, BLOCK_K, BLOCK_V), DOT_DTYPE, PRECISION)
        dv = mma(tl.trans(scores), dnum, DOT_DTYPE, PRECISION) + u[:, None] * k_dc
        _store_rows(DV_ + bh * T * DV, dv, t, t_ok, v0, DV, BLOCK_V)

    # gates: log w_s = b_L - b_s + i~_s, and decay = exp(b_L + m - m'0) multiplies C_c and n_c
    d_i += g_end
    d_b -= g_end
    d_b += tl.where(tl.arange(0, L) == L - 1, tl.sum(g_end, axis=0) + decay * tl.sum(d_decay, axis=0), 0.0)
    # b_t = sum_{j <= t} log f_j, so dL/dlog f_j = sum_{t >= j} dL/db_t (padded positions carry the b_L term)
    d_log_f = tl.cumsum(d_b, axis=0, reverse=True)
    d_f = d_log_f / (1.0 + tl.exp(f))  # d log sigmoid(f) / df = sigmoid(-f)
    tl.store(DI + bh * T + t, d_i, mask=t_ok)
    tl.store(DF + bh * T + t, d_f, mask=t_ok)


# ----------------------------------------------------------------------------------------------------------
# autograd and the public wrapper
# ----------------------------------------------------------------------------------------------------------


def _block(d: int) -> int:
    return min(MAX_BLOCK, max(16, triton.next_power_of_2(d)))  # tl.dot needs every dimension >= 16


def _default_config(DK: int, DV: int, chunk: int) -> dict:
    # chunks of 64+ hold several (L, L) and (L, 64) fp32 tiles: more warps
    return {"BLOCK_K": _block(DK), "BLOCK_V": _block(DV), "num_warps": 4 if chunk <= 32 else 8}


_CONFIGS = [triton.Config({"BLOCK_K": bk, "BLOCK_V": bv}, num_warps=w, num_stages=s)
            for bk in (16, 32, 64, 128) for bv in (16, 32, 64, 128) for w in (4, 8) for s in (1, 2, 3)]


def _prune(configs, named_args, **kwargs):
    """Tiles no wider than the head needs (16 only for heads of 16 or less); large chunks with tiles up to 64."""
    DK, DV, L = ({**named_args, **kwargs}[name] for name in ("DK", "DV", "L"))

    def fits(block, d):
        return block <= max(16, triton.next_power_of_2(d)) and (block > 16 or d <= 16) and (L <= 64 or block <= 64)

    kept = [c for c in configs if fits(c.kwargs["BLOCK_K"], DK) and fits(c.kwargs["BLOCK_V"], DV)]
    return kept or [triton.Config(_default_config(DK, DV, L))]


def _tuned(kernel):
    # the choice depends on the head dims, the chunk and (automatically) the dtypes; the kernels only write
    # what they do not read, so trial runs need no restoring
    return triton.autotune(_CONFIGS, key=["DK", "DV", "L"], prune_configs_by={"early_config_prune": _prune})(kernel)


_states_tuned, _outputs_tuned = _tuned(_chunk_states_kernel), _tuned(_chunk_outputs_kernel)
_state_grads_tuned, _grads_tuned = _tuned(_chunk_state_grads_kernel), _tuned(_chunk_grads_kernel)


# The kernels run inside two registered operators (`torch.library.custom_op`), the forward and the backward,
# with the backward registered as the forward's autograd formula and fake (meta) implementations of both:
# torch.compile and torch.export then trace the model through them without graph breaks, and
# `torch.library.opcheck` tests their registrations.
#
#     mlstm_chunkwise_triton_forward(q, k, v, i, f, C0, n0, m0, eps, chunk)
#         -> h (fp32), C', n', m' (final state), and for the backward C_states, n_states, m_states
#            (B, NH, NC + 1, ...: the state at every chunk boundary), den, stab (B, NH, T)
#     mlstm_chunkwise_triton_backward(saved..., d_h, d_C', d_n', eps, chunk) -> dq, dk, dv, di, df, dC0, dn0, dm0


@torch.library.custom_op("xlstm_hf::mlstm_chunkwise_triton_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
             C0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor, eps: float, chunk: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, torch.Tensor]:
    B, NH, T, DK = q.shape
    DV = v.shape[-1]
    NC = triton.cdiv(T, chunk)
    q, k, v, i, f = (x.contiguous() for x in (q, k, v, i, f))
    dev, fp32 = q.device, torch.float32
    C_states = torch.empty(B, NH, NC + 1, DK, DV, device=dev, dtype=fp32)
    n_states = torch.empty(B, NH, NC + 1, DK, device=dev, dtype=fp32)
    m_states = torch.empty(B, NH, NC + 1, device=dev, dtype=fp32)
    C_states[:, :, 0], n_states[:, :, 0], m_states[:, :, 0] = C0, n0, m0
    h = torch.empty(B, NH, T, DV, device=dev, dtype=fp32)
    den = torch.empty(B, NH, T, device=dev, dtype=fp32)
    stab = torch.empty(B, NH, T, device=dev, dtype=fp32)
    scale = 1.0 / math.sqrt(DK)
    default = _default_config(DK, DV, chunk)
    sizes = dict(DK=DK, DV=DV, L=chunk, **dot_precision(q.dtype))
    launch(_chunk_states_kernel, _states_tuned,
           lambda c: (B * NH, triton.cdiv(DK, c["BLOCK_K"]), triton.cdiv(DV, c["BLOCK_V"])), default,
           k, v, i, f, C_states, n_states, m_states, scale, T, NC, **sizes)
    launch(_chunk_outputs_kernel, _outputs_tuned, lambda c: (B * NH, NC, triton.cdiv(DV, c["BLOCK_V"])), default,
           q, k, v, i, f, C_states, n_states, m_states, h, den, stab, scale, eps, T, NC, **sizes)
    final = (C_states[:, :, NC].clone(), n_states[:, :, NC].clone(), m_states[:, :, NC].clone())
    return h, *final, C_states, n_states, m_states, den, stab


@_forward.register_fake
def _(q, k, v, i, f, C0, n0, m0, eps, chunk):
    B, NH, T, DK = q.shape
    DV, NC, fp32 = v.shape[-1], -(-T // chunk), torch.float32
    new = lambda *shape: q.new_empty(shape, dtype=fp32)  # noqa: E731
    return (new(B, NH, T, DV), new(B, NH, DK, DV), new(B, NH, DK), new(B, NH), new(B, NH, NC + 1, DK, DV),
            new(B, NH, NC + 1, DK), new(B, NH, NC + 1), new(B, NH, T), new(B, NH, T))


@torch.library.custom_op("xlstm_hf::mlstm_chunkwise_triton_backward", mutates_args=())
def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
              C_states: torch.Tensor, n_states: torch.Tensor, m_states: torch.Tensor, h: torch.Tensor,
              den: torch.Tensor, stab: torch.Tensor, d_h: torch.Tensor, d_C_final: torch.Tensor,
              d_n_final: torch.Tensor, eps: float, chunk: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, torch.Tensor]:
    B, NH, T, DK = q.shape
    DV = v.shape[-1]
    NC = C_states.shape[2] - 1
    fp32 = torch.float32
    q, k, v, i, f = (x.contiguous() for x in (q, k, v, i, f))
    # h = num / N with N = max(|den|, exp(-stab)) + eps and stab a constant, so
    # dnum = dh / N and dden = -(dh . h) / N * sign(den) * [|den| > exp(-stab)]
    floor = torch.exp(-stab)
    normaliser = torch.maximum(den.abs(), floor) + eps
    d_h = d_h.to(fp32)
    d_num = (d_h / normaliser[..., None]).contiguous()
    d_den = (-(d_h * h).sum(-1) / normaliser * torch.sign(den) * (den.abs() > floor)).contiguous()

    dC_states = torch.empty_like(C_states)
    dn_states = torch.empty_like(n_states)
    # the gradient of the final m is dropped: m only stabilises (see xlstm_hf.cells)
    dC_states[:, :, NC] = d_C_final
    dn_states[:, :, NC] = d_n_final
    scale = 1.0 / math.sqrt(DK)
    default = _default_config(DK, DV, chunk)
    sizes = dict(DK=DK, DV=DV, L=chunk, **dot_precision(q.dtype))
    launch(_chunk_state_grads_kernel, _state_grads_tuned,
           lambda c: (B * NH, triton.cdiv(DK, c["BLOCK_K"]), triton.cdiv(DV, c["BLOCK_V"])), default,
           q, i, f, m_states, stab, d_num, d_den, dC_states, dn_states, T, NC, **sizes)
    dq = torch.empty(q.shape, device=q.device, dtype=fp32)
    dk = torch.empty(k.shape, device=q.device, dtype=fp32)
    dv = torch.empty(v.shape, device=q.device, dtype=fp32)
    di = torch.empty(i.shape, device=q.device, dtype=fp32)
    df = torch.empty(f.shape, device=q.device, dtype=fp32)
    launch(_chunk_grads_kernel, _grads_tuned, lambda c: (B * NH, NC), default,
           q, k, v, i, f, C_states, n_states, m_states, d_num, d_den, dC_states, dn_states,
           dq, dk, dv, di, df, scale, T, NC, **sizes)

    # the initial state: C_0 and n_0 enter as exp(m_0) C_0, exp(m_0) n_0 (through carry and decay)
    dC0, dn0 = dC_states[:, :, 0].clone(), dn_states[:, :, 0].clone()
    dm0 = (dC0 * C_states[:, :, 0]).sum((-2, -1)) + (dn0 * n_states[:, :, 0]).sum(-1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), di.to(i.dtype), df.to(f.dtype), dC0, dn0, dm0


@_backward.register_fake
def _(q, k, v, i, f, C_states, n_states, m_states, h, den, stab, d_h, d_C_final, d_n_final, eps, chunk):
    fp32 = torch.float32
    dense = lambda x: torch.empty_like(x, memory_format=torch.contiguous_format)  # noqa: E731 (as the kernels write)
    return (dense(q), dense(k), dense(v), dense(i), dense(f),
            C_states.new_empty(C_states[:, :, 0].shape, dtype=fp32), n_states.new_empty(n_states[:, :, 0].shape, dtype=fp32),
            m_states.new_empty(m_states[:, :, 0].shape, dtype=fp32))


def _setup_context(ctx, inputs, output):
    q, k, v, i, f, *_, eps, chunk = inputs
    h, _C, _n, m_final, C_states, n_states, m_states, den, stab = output
    ctx.save_for_backward(q, k, v, i, f, C_states, n_states, m_states, h, den, stab)
    ctx.eps, ctx.chunk = eps, chunk
    # m is a stabiliser (a constant for autograd); the boundary states and den, stab are for the backward
    ctx.mark_non_differentiable(m_final, C_states, n_states, m_states, den, stab)


def _autograd(ctx, d_h, d_C_final, d_n_final, *_):
    q, k, v, i, f, C_states, n_states, m_states, h, den, stab = ctx.saved_tensors
    d_h = torch.zeros_like(h) if d_h is None else d_h
    d_C_final = torch.zeros_like(C_states[:, :, -1]) if d_C_final is None else d_C_final
    d_n_final = torch.zeros_like(n_states[:, :, -1]) if d_n_final is None else d_n_final
    grads = torch.ops.xlstm_hf.mlstm_chunkwise_triton_backward(
        q, k, v, i, f, C_states, n_states, m_states, h, den, stab, d_h, d_C_final, d_n_final, ctx.eps, ctx.chunk)
    return (*grads, None, None)


_forward.register_autograd(_autograd, setup_context=_setup_context)


def _check(q, k, v, i, f, chunk_size):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, NH, T, DK) and v (B, NH, T, DV); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if i.shape != q.shape[:3] or f.shape != q.shape[:3]:
        raise ValueError(f"expected gates i, f of shape {tuple(q.shape[:3])}; got {tuple(i.shape)}, {tuple(f.shape)}")
    if q.shape[2] == 0 or q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"empty sequence or head dimension: q {tuple(q.shape)}, v {tuple(v.shape)}")
    supported = (torch.float32, torch.bfloat16, torch.float16)
    if any(x.dtype not in supported for x in (q, k, v, i, f)):
        raise ValueError(f"the Triton mLSTM kernel supports float32, bfloat16 and float16 inputs; got "
                         f"{[str(x.dtype) for x in (q, k, v, i, f)]} (use xlstm_hf.cells.mlstm_chunkwise)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def mlstm_chunkwise_triton(q, k, v, i, f, initial_state=None, output_final_state=False, eps=1e-6, chunk_size=64,
                           resets=None):
    """`xlstm_hf.cells.mlstm_chunkwise` in Triton (same signature, shapes, semantics and gradients).

    q, k: (B, NH, T, DK); v: (B, NH, T, DV); i, f: (B, NH, T) gate pre-activations; any T >= 1.
    initial_state / returned state: (C (B, NH, DK, DV), n (B, NH, DK), m (B, NH)) in float32.
    resets: (B, T) bool or None, True where a packed document starts (nothing before it is seen).
    Returns (h (B, NH, T, DV) in v.dtype, final state or None).
    """
    _check(q, k, v, i, f, chunk_size)
    B, NH, T, DK = q.shape
    if resets is not None:  # a document start is a forget gate of exactly zero (see the module docstring)
        f = f.masked_fill(check_resets(resets, B, T)[:, None, :], float("-inf"))
    DV = v.shape[-1]
    # Chunking does not change the function, only the work split: take the nearest chunk size the
    # kernels support (tl.dot needs >= 16), and for a sequence within one chunk the smallest that holds it.
    chunk = min(max(CHUNK_SIZES[0], triton.next_power_of_2(chunk_size)), CHUNK_SIZES[-1])
    chunk = chunk if T > chunk else max(CHUNK_SIZES[0], triton.next_power_of_2(T))
    if initial_state is None:
        C0 = torch.zeros(B, NH, DK, DV, device=q.device, dtype=torch.float32)
        n0 = torch.zeros(B, NH, DK, device=q.device, dtype=torch.float32)
        m0 = torch.full((B, NH), float("-inf"), device=q.device, dtype=torch.float32)
    else:
        C0, n0, m0 = (s.to(torch.float32) for s in initial_state)
        if C0.shape != (B, NH, DK, DV) or n0.shape != (B, NH, DK) or m0.shape != (B, NH):
            raise ValueError(f"initial_state must be C {(B, NH, DK, DV)}, n {(B, NH, DK)}, m {(B, NH)}; got "
                             f"{tuple(C0.shape)}, {tuple(n0.shape)}, {tuple(m0.shape)}")
    h, C, n, m = torch.ops.xlstm_hf.mlstm_chunkwise_triton_forward(q, k, v, i, f, C0, n0, m0, eps, chunk)[:4]
    return h.to(v.dtype), ((C, n, m) if output_final_state else None)
