"""Fused sLSTM recurrence over time in Triton (forward and backward), the FlashRNN idea.

One program owns one head and a tile of batch rows for the whole sequence, so the recurrence needs no
synchronisation between programs (which also keeps it testable in Triton's interpreter, which runs the
programs of a launch one after another). Each step computes the gate pre-activations
x_t + h_{t-1} R_g + b_g for the four gates g = i, f, z, o and the pointwise cell. The reference is
`xlstm_hf.cells.slstm_recurrent`; this computes the same function.

How R is held depends on the head dim:
- DH <= BLOCK_D (heads up to 64): the four DH x DH matrices are loaded once and stay in registers for the
  whole sequence; each step is four small matmuls.
- larger heads (the paper's 125M model: 4 heads of 192; up to 512 and beyond): each step's products are
  tiled over BLOCK_D x BLOCK_D tiles of R (output columns n, reduction rows k), streamed from L2 (a head's
  R, 4 DH^2 values, stays resident there). h_{t-1} is re-read in K tiles from the stored states, which the
  program wrote in the previous step: a barrier (`tl.debug_barrier`, i.e. __syncthreads) after each step
  orders those writes before the reads.
  Cost per step and program on an H100, bf16, DH = 192: 295 KB of R from L2 and 4.7 MFLOP of tensor-core
  work, ~2.5-3 us (L2 -> SM bandwidth bound); see kernels/README.md.

Backward: the forward saves the raw gate pre-activations (fp32, as large as x; only when a gradient is
needed), so the backward's steps need no recomputation: per step, the pointwise gradients of the four gates
(written as dx), a barrier, then dh_{t-1} = sum_g dx_g R_g^T tiled like the forward. dR = sum_t h_{t-1}^T dx_t
and the bias gradient are one batched matmul and one sum over all steps after the kernel, outside the
sequential loop (tensor cores, full occupancy).

Matmul precision: see `kernels/common.py` (bf16/fp16 inputs: tensor cores with fp32 accumulation; fp32: exact).
States and the cell's math are always fp32.

Stabiliser: the m_t of the forward pass are treated as constants in the backward pass. That is exact,
because the cell's outputs do not depend on the stabiliser (c and n are both scaled by exp(-m)); the
gradient of an initial m_0 passed in by the caller is dc_0 c_0 + dn_0 n_0 (its true effect).

Shapes (as the reference): x (B, T, NH, 4, DH) input parts of the gate pre-activations, gates (i, f, z, o);
R (NH, DH, 4, DH); bias (NH, 4, DH); states (B, NH, DH); mask (B, T) bool or None.
"""

import torch
import triton
import triton.language as tl

from .common import dot_precision, launch, mma


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _log_sigmoid(x):
    # log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), stable for large |x|
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _r_tile(R, h_idx, g: tl.constexpr, j0, k0, DH: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (BLOCK_D, BLOCK_D) tile R_g[j0:, k0:] of head h_idx, R_g[j, k] = R[h, j, g, k]; zero outside DH."""
    j = j0 + tl.arange(0, BLOCK_D)
    k = k0 + tl.arange(0, BLOCK_D)
    ptr = R + ((h_idx * DH + j[:, None]) * 4 + g) * DH + k[None, :]
    return tl.load(ptr, mask=(j < DH)[:, None] & (k < DH)[None, :], other=0.0)


@triton.jit
def _load_gates(ptr, ok, DH: tl.constexpr):
    """The four gate rows (i, f, z, o) at ptr (a (rows, cols) block of pointers into a (..., 4, DH) tensor), fp32."""
    return (tl.load(ptr + 0 * DH, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptr + 1 * DH, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptr + 2 * DH, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptr + 3 * DH, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def _slstm_fwd_kernel(
    X, R, BIAS, MASK, STATES, GATES,  # STATES (4, B, T+1, NH, DH) fp32: h, c, n, m, time 0 = initial state
    B, T, NH: tl.constexpr, DH: tl.constexpr,  # GATES like X, fp32: the raw pre-activations, for the backward
    HAS_MASK: tl.constexpr, SAVE_GATES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    h_idx = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    d = tl.arange(0, BLOCK_D)
    if DH <= BLOCK_D:  # the whole head's R fits: load it once, keep it in registers
        r_i = _r_tile(R, h_idx, 0, 0, 0, DH, BLOCK_D).to(DOT_DTYPE)
        r_f = _r_tile(R, h_idx, 1, 0, 0, DH, BLOCK_D).to(DOT_DTYPE)
        r_z = _r_tile(R, h_idx, 2, 0, 0, DH, BLOCK_D).to(DOT_DTYPE)
        r_o = _r_tile(R, h_idx, 3, 0, 0, DH, BLOCK_D).to(DOT_DTYPE)
    splane = B * (T + 1) * NH * DH
    for t in range(T):
        s_t = ((rows[:, None] * (T + 1) + t) * NH + h_idx) * DH  # row offsets of the state before step t
        if HAS_MASK:
            keep = (tl.load(MASK + rows * T + t, mask=row_ok, other=0) != 0)[:, None]
        for n0 in range(0, DH, BLOCK_D):  # a tile of the state's columns
            cols = n0 + d
            ok = row_ok[:, None] & (cols < DH)[None, :]
            x_ptr = X + ((rows[:, None] * T + t) * NH + h_idx) * 4 * DH + cols[None, :]
            i_raw, f_raw, z_raw, o_raw = _load_gates(x_ptr, ok, DH)
            i_raw += tl.load(BIAS + (h_idx * 4 + 0) * DH + cols, mask=cols < DH, other=0.0).to(tl.float32)[None, :]
            f_raw += tl.load(BIAS + (h_idx * 4 + 1) * DH + cols, mask=cols < DH, other=0.0).to(tl.float32)[None, :]
            z_raw += tl.load(BIAS + (h_idx * 4 + 2) * DH + cols, mask=cols < DH, other=0.0).to(tl.float32)[None, :]
            o_raw += tl.load(BIAS + (h_idx * 4 + 3) * DH + cols, mask=cols < DH, other=0.0).to(tl.float32)[None, :]
            for k0 in range(0, DH, BLOCK_D):  # + h_{t-1} R_g, over tiles of the reduction
                kk = k0 + d
                h_prev = tl.load(STATES + s_t + kk[None, :], mask=row_ok[:, None] & (kk < DH)[None, :], other=0.0)
                if DH <= BLOCK_D:
                    i_raw += mma(h_prev, r_i, DOT_DTYPE, PRECISION)
                    f_raw += mma(h_prev, r_f, DOT_DTYPE, PRECISION)
                    z_raw += mma(h_prev, r_z, DOT_DTYPE, PRECISION)
                    o_raw += mma(h_prev, r_o, DOT_DTYPE, PRECISION)
                else:
                    i_raw += mma(h_prev, _r_tile(R, h_idx, 0, k0, n0, DH, BLOCK_D), DOT_DTYPE, PRECISION)
                    f_raw += mma(h_prev, _r_tile(R, h_idx, 1, k0, n0, DH, BLOCK_D), DOT_DTYPE, PRECISION)
                    z_raw += mma(h_prev, _r_tile(R, h_idx, 2, k0, n0, DH, BLOCK_D), DOT_DTYPE, PRECISION)
                    o_raw += mma(h_prev, _r_tile(R, h_idx, 3, k0, n0, DH, BLOCK_D), DOT_DTYPE, PRECISION)
            if SAVE_GATES:
                g_ptr = GATES + ((rows[:, None] * T + t) * NH + h_idx) * 4 * DH + cols[None, :]
                tl.store(g_ptr + 0 * DH, i_raw, mask=ok)
                tl.store(g_ptr + 1 * DH, f_raw, mask=ok)
                tl.store(g_ptr + 2 * DH, z_raw, mask=ok)
                tl.store(g_ptr + 3 * DH, o_raw, mask=ok)
            prev = STATES + s_t + cols[None, :]
            h = tl.load(prev + 0 * splane, mask=ok, other=0.0)
            c = tl.load(prev + 1 * splane, mask=ok, other=0.0)
            n = tl.load(prev + 2 * splane, mask=ok, other=0.0)
            m = tl.load(prev + 3 * splane, mask=ok, other=0.0)
            # the cell (paper eqs. 8-17), stabilised: every exponent is <= 0
            log_f_m = m + _log_sigmoid(f_raw)
            m_new = tl.maximum(i_raw, log_f_m)
            i_gate = tl.exp(i_raw - m_new)
            f_gate = tl.exp(log_f_m - m_new)
            c_new = f_gate * c + i_gate * _tanh(z_raw)
            n_new = f_gate * n + i_gate
            h_new = _sigmoid(o_raw) * c_new / n_new
            if HAS_MASK:  # a padded step carries the state through unchanged
                h_new = tl.where(keep, h_new, h)
                c_new = tl.where(keep, c_new, c)
                n_new = tl.where(keep, n_new, n)
                m_new = tl.where(keep, m_new, m)
            cur = prev + NH * DH
            tl.store(cur + 0 * splane, h_new, mask=ok)
            tl.store(cur + 1 * splane, c_new, mask=ok)
            tl.store(cur + 2 * splane, n_new, mask=ok)
            tl.store(cur + 3 * splane, m_new, mask=ok)
        tl.debug_barrier()  # h_t is complete in memory before step t + 1 reads it in K tiles


@triton.jit
def _slstm_bwd_kernel(
    R, GATES, STATES, MASK, DOUT, DX,  # DOUT (B, T, NH, DH) fp32; DX like GATES, in x's dtype
    DS,  # (4, B, NH, DH) fp32: on entry dh, dc, dn of the final state; the running gradients of the state
    #      after each step; on exit the initial state's dh, dc, dn, dm
    B, T, NH: tl.constexpr, DH: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    h_idx = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    d = tl.arange(0, BLOCK_D)
    if DH <= BLOCK_D:
        r_i = _r_tile(R, h_idx, 0, 0, 0, DH, BLOCK_D).to(DOT_DTYPE)
        r_f = _r_tile(R, h_idx, 1, 0, 0, DH, BLOCK_D).to(DOT_DTYPE)
        r_z = _r_tile(R, h_idx, 2, 0, 0, DH, BLOCK_D).to(DOT_DTYPE)
        r_o = _r_tile(R, h_idx, 3, 0, 0, DH, BLOCK_D).to(DOT_DTYPE)
    splane = B * (T + 1) * NH * DH
    dplane = B * NH * DH
    ds_row = (rows[:, None] * NH + h_idx) * DH
    for step in range(T):
        t = T - 1 - step
        s_t = ((rows[:, None] * (T + 1) + t) * NH + h_idx) * DH
        g_row = ((rows[:, None] * T + t) * NH + h_idx) * 4 * DH
        if HAS_MASK:
            keep = (tl.load(MASK + rows * T + t, mask=row_ok, other=0) != 0)[:, None]
        # 1. pointwise: the gradients of the four gate pre-activations, tile by tile of the state
        for n0 in range(0, DH, BLOCK_D):
            cols = n0 + d
            ok = row_ok[:, None] & (cols < DH)[None, :]
            i_raw, f_raw, z_raw, o_raw = _load_gates(GATES + g_row + cols[None, :], ok, DH)
            prev = STATES + s_t + cols[None, :]
            cur = prev + NH * DH
            c_prev = tl.load(prev + 1 * splane, mask=ok, other=0.0)
            n_prev = tl.load(prev + 2 * splane, mask=ok, other=0.0)
            m_prev = tl.load(prev + 3 * splane, mask=ok, other=0.0)
            c_cur = tl.load(cur + 1 * splane, mask=ok, other=0.0)
            n_cur = tl.load(cur + 2 * splane, mask=ok, other=1.0)
            m_cur = tl.load(cur + 3 * splane, mask=ok, other=0.0)
            ds = DS + ds_row + cols[None, :]
            dh = tl.load(ds + 0 * dplane, mask=ok, other=0.0)
            dh += tl.load(DOUT + ((rows[:, None] * T + t) * NH + h_idx) * DH + cols[None, :], mask=ok, other=0.0)
            dc = tl.load(ds + 1 * dplane, mask=ok, other=0.0)
            dn = tl.load(ds + 2 * dplane, mask=ok, other=0.0)
            i_gate = tl.exp(i_raw - m_cur)
            f_gate = tl.exp(m_prev + _log_sigmoid(f_raw) - m_cur)
            z_val = _tanh(z_raw)
            o_gate = _sigmoid(o_raw)
            do_raw = dh * c_cur / n_cur * o_gate * (1.0 - o_gate)
            dc_t = dc + dh * o_gate / n_cur  # total gradients of c_t and n_t
            dn_t = dn - dh * o_gate * c_cur / (n_cur * n_cur)
            di_raw = (dc_t * z_val + dn_t) * i_gate
            dz_raw = dc_t * i_gate * (1.0 - z_val * z_val)
            df_raw = (dc_t * c_prev + dn_t * n_prev) * f_gate * _sigmoid(-f_raw)
            dc_prev = dc_t * f_gate
            dn_prev = dn_t * f_gate
            if HAS_MASK:
                # a padded step passed the state through unchanged, so its gradients pass through too (the
                # values computed above may be inf/nan there, e.g. before the first real token: never used)
                di_raw = tl.where(keep, di_raw, 0.0)
                df_raw = tl.where(keep, df_raw, 0.0)
                dz_raw = tl.where(keep, dz_raw, 0.0)
                do_raw = tl.where(keep, do_raw, 0.0)
                dc_prev = tl.where(keep, dc_prev, dc)
                dn_prev = tl.where(keep, dn_prev, dn)
                dh_pass = tl.where(keep, 0.0, dh)
            else:
                dh_pass = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
            dx = DX + g_row + cols[None, :]
            tl.store(dx + 0 * DH, di_raw.to(DX.dtype.element_ty), mask=ok)
            tl.store(dx + 1 * DH, df_raw.to(DX.dtype.element_ty), mask=ok)
            tl.store(dx + 2 * DH, dz_raw.to(DX.dtype.element_ty), mask=ok)
            tl.store(dx + 3 * DH, do_raw.to(DX.dtype.element_ty), mask=ok)
            tl.store(ds + 0 * dplane, dh_pass, mask=ok)
            tl.store(ds + 1 * dplane, dc_prev, mask=ok)
            tl.store(ds + 2 * dplane, dn_prev, mask=ok)
        tl.debug_barrier()  # this step's gate gradients are in memory before they are read in K tiles
        # 2. dh_{t-1} = (pass-through) + sum_g dx_g R_g^T, tile by tile of h_{t-1}
        for j0 in range(0, DH, BLOCK_D):
            jj = j0 + d
            ok = row_ok[:, None] & (jj < DH)[None, :]
            acc = tl.load(DS + ds_row + jj[None, :], mask=ok, other=0.0)
            for k0 in range(0, DH, BLOCK_D):
                kk = k0 + d
                di_raw, df_raw, dz_raw, do_raw = _load_gates(DX + g_row + kk[None, :],
                                                             row_ok[:, None] & (kk < DH)[None, :], DH)
                if DH <= BLOCK_D:
                    acc += mma(di_raw, tl.trans(r_i), DOT_DTYPE, PRECISION)
                    acc += mma(df_raw, tl.trans(r_f), DOT_DTYPE, PRECISION)
                    acc += mma(dz_raw, tl.trans(r_z), DOT_DTYPE, PRECISION)
                    acc += mma(do_raw, tl.trans(r_o), DOT_DTYPE, PRECISION)
                else:
                    acc += mma(di_raw, tl.trans(_r_tile(R, h_idx, 0, j0, k0, DH, BLOCK_D)), DOT_DTYPE, PRECISION)
                    acc += mma(df_raw, tl.trans(_r_tile(R, h_idx, 1, j0, k0, DH, BLOCK_D)), DOT_DTYPE, PRECISION)
                    acc += mma(dz_raw, tl.trans(_r_tile(R, h_idx, 2, j0, k0, DH, BLOCK_D)), DOT_DTYPE, PRECISION)
                    acc += mma(do_raw, tl.trans(_r_tile(R, h_idx, 3, j0, k0, DH, BLOCK_D)), DOT_DTYPE, PRECISION)
            tl.store(DS + ds_row + jj[None, :], acc, mask=ok)
        tl.debug_barrier()  # dh_{t-1} is complete before step t - 1 reads it

    # the initial m_0 matters through the true state c_0 exp(m_0), n_0 exp(m_0)
    s_0 = STATES + (rows[:, None] * (T + 1) * NH + h_idx) * DH
    for n0 in range(0, DH, BLOCK_D):
        cols = n0 + d
        ok = row_ok[:, None] & (cols < DH)[None, :]
        ds = DS + ds_row + cols[None, :]
        c0 = tl.load(s_0 + 1 * splane + cols[None, :], mask=ok, other=0.0)
        n0_ = tl.load(s_0 + 2 * splane + cols[None, :], mask=ok, other=0.0)
        dm0 = tl.load(ds + 1 * dplane, mask=ok, other=0.0) * c0 + tl.load(ds + 2 * dplane, mask=ok, other=0.0) * n0_
        tl.store(ds + 3 * dplane, dm0, mask=ok)


# ----------------------------------------------------------------------------------------------------------
# launch configurations: autotuned on a GPU per (NH, DH, B) and dtype; the default under the interpreter
# ----------------------------------------------------------------------------------------------------------

#: heads up to this size keep their R in registers; larger ones stream it from L2 in BLOCK_D x BLOCK_D tiles
MAX_RESIDENT_HEAD_DIM = 64


def _resident_block(DH: int) -> int:
    return max(16, triton.next_power_of_2(DH))  # tl.dot needs every dimension >= 16


def _default_config(B: int, DH: int) -> dict:
    block_d = _resident_block(DH) if DH <= MAX_RESIDENT_HEAD_DIM else 64
    return {"BLOCK_B": 16 if B <= 16 else 32, "BLOCK_D": block_d, "num_warps": 4 if block_d <= 32 else 8}


_CONFIGS = [triton.Config({"BLOCK_B": bb, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bd in (16, 32, 64, 128) for bb in (16, 32, 64) for w in (4, 8) for s in (1, 2)]


def _prune(configs, named_args, **kwargs):
    """Keep the configurations that fit the head: the resident tile for small heads, 32-128 for large ones;
    batch tiles no larger than the batch needs."""
    DH, B = ({**named_args, **kwargs}[name] for name in ("DH", "B"))
    blocks = (_resident_block(DH),) if DH <= MAX_RESIDENT_HEAD_DIM else (32, 64, 128)
    max_bb = max(16, triton.next_power_of_2(B))
    kept = [c for c in configs if c.kwargs["BLOCK_D"] in blocks and c.kwargs["BLOCK_B"] <= max_bb]
    return kept or [triton.Config(_default_config(B, DH))]


def _grid(NH, B):
    return lambda meta: (NH, triton.cdiv(B, meta["BLOCK_B"]))


_tune = dict(key=["NH", "DH", "B"], prune_configs_by={"early_config_prune": _prune})
_fwd_tuned = triton.autotune(_CONFIGS, **_tune)(_slstm_fwd_kernel)
# the backward updates DS in place: autotuning restores it between its trial runs
_bwd_tuned = triton.autotune(_CONFIGS, restore_value=["DS"], **_tune)(_slstm_bwd_kernel)


# ----------------------------------------------------------------------------------------------------------
# registered operators (`torch.library.custom_op`) with fake implementations, the backward registered as the
# forward's autograd formula: torch.compile traces through them without graph breaks, and
# `torch.library.opcheck` tests the registrations.
#
#     slstm_triton_forward(x, R, bias, h0, c0, n0, m0, mask, save_gates) -> out (fp32), h_T, c_T, n_T, m_T, and
#         for the backward the states (4, B, T + 1, NH, DH) (h, c, n, m before and after every step) and the raw
#         gate pre-activations (like x, fp32; empty unless save_gates)
#     slstm_triton_backward(x, R, gates, states, mask, d_out, d_h, d_c, d_n) -> dx, dR, db, dh0, dc0, dn0, dm0
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("xlstm_hf::slstm_triton_forward", mutates_args=())
def _forward(x: torch.Tensor, recurrent_kernel: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor,
             c0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor, mask: torch.Tensor | None, save_gates: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor]:
    B, T, NH, _, DH = x.shape
    x, recurrent_kernel, bias = x.contiguous(), recurrent_kernel.contiguous(), bias.contiguous()
    states = torch.empty(4, B, T + 1, NH, DH, device=x.device, dtype=torch.float32)
    states[:, :, 0] = torch.stack([h0, c0, n0, m0])
    gates = torch.empty(x.shape if save_gates else (0,), device=x.device, dtype=torch.float32)
    mask_u8 = mask.to(torch.uint8).contiguous() if mask is not None else None
    launch(_slstm_fwd_kernel, _fwd_tuned, _grid(NH, B), _default_config(B, DH),
           x, recurrent_kernel, bias, mask_u8, states, gates, B, T, NH, DH,
           HAS_MASK=mask is not None, SAVE_GATES=save_gates, **dot_precision(x.dtype))
    final = states[:, :, T]
    # (copies: an operator's outputs may not alias each other)
    return (states[0, :, 1:].clone(), final[0].clone(), final[1].clone(), final[2].clone(), final[3].clone(),
            states, gates)


@_forward.register_fake
def _(x, recurrent_kernel, bias, h0, c0, n0, m0, mask, save_gates):
    B, T, NH, _, DH = x.shape
    new = lambda *shape: x.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (new(B, T, NH, DH), new(B, NH, DH), new(B, NH, DH), new(B, NH, DH), new(B, NH, DH),
            new(4, B, T + 1, NH, DH), new(*(x.shape if save_gates else (0,))))


@torch.library.custom_op("xlstm_hf::slstm_triton_backward", mutates_args=())
def _backward(x: torch.Tensor, recurrent_kernel: torch.Tensor, gates: torch.Tensor, states: torch.Tensor,
              mask: torch.Tensor | None, d_out: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor,
              d_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    B, T, NH, _, DH = x.shape
    if gates.shape != x.shape:
        raise RuntimeError("slstm_triton_backward needs the gate pre-activations: run the forward with save_gates")
    recurrent_kernel = recurrent_kernel.contiguous()
    mask_u8 = mask.to(torch.uint8).contiguous() if mask is not None else None
    # the gradient of the final m is not needed: m only stabilises (see the module docstring)
    ds = torch.stack([d_h.float(), d_c.float(), d_n.float(), torch.zeros_like(d_n, dtype=torch.float32)]).contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    launch(_slstm_bwd_kernel, _bwd_tuned, _grid(NH, B), _default_config(B, DH),
           recurrent_kernel, gates, states, mask_u8, d_out.float().contiguous(), dx, ds, B, T, NH, DH,
           HAS_MASK=mask is not None, **dot_precision(x.dtype))
    # dR_g = sum over rows and steps of h_{t-1}^T dx_g: one batched matmul (in x's dtype: tensor cores for half
    # inputs, fp32 accumulation), outside the sequential loop; padded steps have dx = 0
    h_prev = states[0, :, :T].to(dx.dtype)
    dr = torch.einsum("bthj,bthgk->hjgk", h_prev, dx).to(recurrent_kernel.dtype)
    db = dx.sum((0, 1), dtype=torch.float32)
    return dx, dr, db, ds[0].clone(), ds[1].clone(), ds[2].clone(), ds[3].clone()


@_backward.register_fake
def _(x, recurrent_kernel, gates, states, mask, d_out, d_h, d_c, d_n):
    state = lambda: states.new_empty(states.shape[1:2] + states.shape[3:])  # noqa: E731 (B, NH, DH)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(recurrent_kernel, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[2:], dtype=torch.float32), state(), state(), state(), state())


def _setup_context(ctx, inputs, output):
    x, recurrent_kernel, bias, *_, mask, _save = inputs
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, recurrent_kernel, output[5], output[6], mask)
    ctx.mark_non_differentiable(output[4], output[5], output[6])  # m (a stabiliser), the saved states and gates


def _autograd(ctx, d_out, d_h, d_c, d_n, *_):
    x, recurrent_kernel, states, gates, mask = ctx.saved_tensors
    zeros = lambda: states.new_zeros(states.shape[1:2] + states.shape[3:])  # noqa: E731
    d_out = states.new_zeros(states[0, :, 1:].shape) if d_out is None else d_out
    dx, dr, db, *d_state = torch.ops.xlstm_hf.slstm_triton_backward(
        x, recurrent_kernel, gates, states, mask, d_out, zeros() if d_h is None else d_h,
        zeros() if d_c is None else d_c, zeros() if d_n is None else d_n)
    return (dx, dr, db.to(ctx.bias_dtype), *d_state, None, None)


_forward.register_autograd(_autograd, setup_context=_setup_context)


def slstm_recurrent_triton(x, recurrent_kernel, bias, initial_state=None, output_final_state=False, mask=None):
    """`xlstm_hf.cells.slstm_recurrent` as one fused Triton kernel per direction (same signature); any head dim."""
    B, T, NH, _, DH = x.shape
    if initial_state is None:
        zeros = torch.zeros(B, NH, DH, device=x.device, dtype=torch.float32)
        initial_state = (zeros, zeros, zeros, torch.full_like(zeros, float("-inf")))
    tensors = (x, recurrent_kernel, bias, *initial_state)
    save_gates = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    out, *final = torch.ops.xlstm_hf.slstm_triton_forward(x, recurrent_kernel, bias, *initial_state, mask,
                                                           save_gates)[:5]
    return out.to(x.dtype), (tuple(final) if output_final_state else None)
