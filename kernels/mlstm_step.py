"""Fused mLSTM decode step in Triton: one token, state in and out, C updated in place.

One program owns one (batch row, head) and a tile of BLOCK_V value columns; it walks over the key
dimension in tiles of BLOCK_K, updating its columns of the matrix memory C and accumulating q^T C for
its part of the output, so C is read and written exactly once. Programs own disjoint columns of C, which
is why C can be updated in place; n and m are read by every program of a row, so their new values go to
fresh tensors. Reference: `xlstm_hf.cells.mlstm_step` (same function, same signature).
"""

import math

import torch
import triton
import triton.language as tl

from .common import launch


@triton.jit
def _mlstm_step_kernel(
    Q, K, V, I, F, C, N, M, C_OUT, N_OUT, M_OUT, H,
    scale, eps, BH, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    bh = tl.program_id(0)  # flattened (batch, head)
    pid_v = tl.program_id(1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < DV
    i_pre = tl.load(I + bh).to(tl.float32)
    f_pre = tl.load(F + bh).to(tl.float32)
    m = tl.load(M + bh)
    log_f = tl.minimum(f_pre, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f_pre)))  # log sigmoid
    m_new = tl.maximum(log_f + m, i_pre)
    m_new0 = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: subtract 0
    decay = tl.exp(log_f + m - m_new0)
    gain = tl.exp(i_pre - m_new0)
    v = tl.load(V + bh * DV + cols, mask=col_ok, other=0.0).to(tl.float32)
    numerator = tl.zeros((BLOCK_V,), dtype=tl.float32)
    qn = tl.sum(tl.zeros((BLOCK_K,), dtype=tl.float32), axis=0)  # a float32 scalar carried by the loop
    for k0 in range(0, DK, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        row_ok = rows < DK
        q = tl.load(Q + bh * DK + rows, mask=row_ok, other=0.0).to(tl.float32)
        k = tl.load(K + bh * DK + rows, mask=row_ok, other=0.0).to(tl.float32) * scale
        c_off = bh * DK * DV + rows[:, None] * DV + cols[None, :]
        c_ok = row_ok[:, None] & col_ok[None, :]
        c = tl.load(C + c_off, mask=c_ok, other=0.0)
        c = decay * c + (gain * k)[:, None] * v[None, :]
        tl.store(C_OUT + c_off, c, mask=c_ok)
        numerator += tl.sum(q[:, None] * c, axis=0)
        n = decay * tl.load(N + bh * DK + rows, mask=row_ok, other=0.0) + gain * k
        qn += tl.sum(q * n, axis=0)
        if pid_v == 0:
            tl.store(N_OUT + bh * DK + rows, n, mask=row_ok)
    if pid_v == 0:
        tl.store(M_OUT + bh, m_new)
    normaliser = tl.maximum(tl.abs(qn), tl.exp(-m_new)) + eps
    tl.store(H + bh * DV + cols, numerator / normaliser, mask=col_ok)


def _default_config(DK: int, DV: int) -> dict:
    return {"BLOCK_K": min(64, triton.next_power_of_2(DK)), "BLOCK_V": min(64, triton.next_power_of_2(DV))}


def _prune(configs, named_args, **kwargs):
    DK, DV = ({**named_args, **kwargs}[name] for name in ("DK", "DV"))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(16, triton.next_power_of_2(DK))
            and c.kwargs["BLOCK_V"] <= max(16, triton.next_power_of_2(DV))]
    return kept or [triton.Config(_default_config(DK, DV))]


# memory-bound: the best tiles trade programs (occupancy at small batch: BH = B * NH rows) against re-reading
# q, k and n per tile of columns. C is updated in place, so trial runs restore it.
_tuned = triton.autotune(
    [triton.Config({"BLOCK_K": bk, "BLOCK_V": bv}, num_warps=w) for bk in (32, 64, 128) for bv in (16, 32, 64, 128)
     for w in (2, 4, 8)],
    key=["BH", "DK", "DV"], restore_value=["C"], prune_configs_by={"early_config_prune": _prune})(_mlstm_step_kernel)


@torch.library.custom_op("xlstm_hf::mlstm_step_triton", mutates_args=("C",))
def _step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor, C: torch.Tensor,
          n: torch.Tensor, m: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel as a registered operator (so that a compiled decode step calls it without a graph break):
    C (float32, contiguous) updated in place; returns h, n', m' (float32)."""
    B, NH, DK = q.shape
    DV = v.shape[-1]
    n_out = torch.empty(B, NH, DK, device=q.device, dtype=torch.float32)
    m_out = torch.empty(B, NH, device=q.device, dtype=torch.float32)
    h = torch.empty(B, NH, DV, device=q.device, dtype=torch.float32)
    # programs own disjoint columns of C: updating it where it lies is race-free
    launch(_mlstm_step_kernel, _tuned, lambda c: (B * NH, triton.cdiv(DV, c["BLOCK_V"])), _default_config(DK, DV),
           q.contiguous(), k.contiguous(), v.contiguous(), i.contiguous(), f.contiguous(),
           C, n.float().contiguous(), m.float().contiguous(), C, n_out, m_out, h,
           1.0 / math.sqrt(DK), eps, B * NH, DK, DV)
    return h, n_out, m_out


@_step.register_fake
def _(q, k, v, i, f, C, n, m, eps):
    fp32 = torch.float32
    return v.new_empty(v.shape, dtype=fp32), q.new_empty(q.shape, dtype=fp32), q.new_empty(q.shape[:2], dtype=fp32)


def mlstm_step_triton(q, k, v, i, f, state, eps=1e-6):
    """One mLSTM step. q, k: (B, NH, DK); v: (B, NH, DV); i, f: (B, NH); state (C, n, m) float32.

    Returns (h (B, NH, DV) float32, new state). C is updated in place when that is safe (float32,
    contiguous, no autograd); this kernel has no backward, so with autograd on it defers to the reference.
    """
    C, n, m = state
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, i, f, C, n, m)):
        from xlstm_hf.cells import mlstm_step

        return mlstm_step(q, k, v, i, f, state, eps=eps)
    if not (C.dtype == torch.float32 and C.is_contiguous()):
        C = C.float().contiguous()  # (a copy: the caller's C is then left as it was)
    h, n_out, m_out = torch.ops.xlstm_hf.mlstm_step_triton(q, k, v, i, f, C, n, m, eps)
    return h, (C, n_out, m_out)
