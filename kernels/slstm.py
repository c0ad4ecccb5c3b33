"""Fused sLSTM recurrence over time in Triton (forward and backward), the FlashRNN idea.

One program owns one head and a tile of batch rows for the whole sequence: the head's four recurrent
matrices R_g (DH x DH) are loaded once and stay on chip while the program walks over time, so each step
costs four small matmuls h_{t-1} R_g plus the pointwise cell, with no round trip through global memory
for R. The reference is `xlstm_hf.cells.slstm_recurrent`; this computes the same function.

Stabiliser: the m_t of the forward pass are treated as constants in the backward pass. That is exact,
because the cell's outputs do not depend on the stabiliser (c and n are both scaled by exp(-m)); the
gradient of an initial m_0 passed in by the caller is dc_0 c_0 + dn_0 n_0 (its true effect).

Shapes (as the reference): x (B, T, NH, 4, DH) input parts of the gate pre-activations, gates (i, f, z, o);
R (NH, DH, 4, DH); bias (NH, 4, DH); states (B, NH, DH); mask (B, T) bool or None.
"""

import warnings

import torch
import triton
import triton.language as tl


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
def _load_head(R, BIAS, h_idx, d, d_ok, rr_ok, DH: tl.constexpr):
    """This head's recurrent matrices R_g[j, k] = R[h, j, g, k] (BLOCK_D x BLOCK_D) and biases, fp32."""
    r_base = R + h_idx * DH * 4 * DH + d[:, None] * 4 * DH + d[None, :]
    b_base = BIAS + h_idx * 4 * DH + d
    return (
        tl.load(r_base + 0 * DH, mask=rr_ok, other=0.0).to(tl.float32),
        tl.load(r_base + 1 * DH, mask=rr_ok, other=0.0).to(tl.float32),
        tl.load(r_base + 2 * DH, mask=rr_ok, other=0.0).to(tl.float32),
        tl.load(r_base + 3 * DH, mask=rr_ok, other=0.0).to(tl.float32),
        tl.load(b_base + 0 * DH, mask=d_ok, other=0.0).to(tl.float32),
        tl.load(b_base + 1 * DH, mask=d_ok, other=0.0).to(tl.float32),
        tl.load(b_base + 2 * DH, mask=d_ok, other=0.0).to(tl.float32),
        tl.load(b_base + 3 * DH, mask=d_ok, other=0.0).to(tl.float32),
    )


@triton.jit
def _preactivations(x_ptr, ok, DH: tl.constexpr, h_prev, r_i, r_f, r_z, r_o, b_i, b_f, b_z, b_o):
    """Gate pre-activations x_t + h_{t-1} R_g + b_g for the four gates (i, f, z, o), fp32."""
    i_raw = tl.load(x_ptr + 0 * DH, mask=ok, other=0.0).to(tl.float32) + b_i[None, :]
    f_raw = tl.load(x_ptr + 1 * DH, mask=ok, other=0.0).to(tl.float32) + b_f[None, :]
    z_raw = tl.load(x_ptr + 2 * DH, mask=ok, other=0.0).to(tl.float32) + b_z[None, :]
    o_raw = tl.load(x_ptr + 3 * DH, mask=ok, other=0.0).to(tl.float32) + b_o[None, :]
    i_raw += tl.dot(h_prev, r_i, input_precision="ieee")
    f_raw += tl.dot(h_prev, r_f, input_precision="ieee")
    z_raw += tl.dot(h_prev, r_z, input_precision="ieee")
    o_raw += tl.dot(h_prev, r_o, input_precision="ieee")
    return i_raw, f_raw, z_raw, o_raw


@triton.jit
def _slstm_fwd_kernel(
    X, R, BIAS, MASK, STATES,  # STATES: (4, B, T+1, NH, DH) float32: h, c, n, m; time index 0 = initial state
    B, T, NH: tl.constexpr, DH: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h_idx = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    d_ok = d < DH
    rd_ok = row_ok[:, None] & d_ok[None, :]
    rr_ok = d_ok[:, None] & d_ok[None, :]
    # recurrent matrices of this head, kept on chip for the whole sequence, and its biases
    r_i, r_f, r_z, r_o, b_i, b_f, b_z, b_o = _load_head(R, BIAS, h_idx, d, d_ok, rr_ok, DH)

    splane = B * (T + 1) * NH * DH
    s0_off = (rows[:, None] * (T + 1) * NH + h_idx) * DH + d[None, :]
    h = tl.load(STATES + 0 * splane + s0_off, mask=rd_ok, other=0.0)
    c = tl.load(STATES + 1 * splane + s0_off, mask=rd_ok, other=0.0)
    n = tl.load(STATES + 2 * splane + s0_off, mask=rd_ok, other=0.0)
    m = tl.load(STATES + 3 * splane + s0_off, mask=rd_ok, other=0.0)
    for t in range(T):
        x_off = ((rows[:, None] * T + t) * NH + h_idx) * 4 * DH + d[None, :]
        i_raw, f_raw, z_raw, o_raw = _preactivations(X + x_off, rd_ok, DH, h, r_i, r_f, r_z, r_o, b_i, b_f, b_z, b_o)
        log_f_m = m + _log_sigmoid(f_raw)
        m_new = tl.maximum(i_raw, log_f_m)
        i_gate = tl.exp(i_raw - m_new)
        f_gate = tl.exp(log_f_m - m_new)
        c_new = f_gate * c + i_gate * _tanh(z_raw)
        n_new = f_gate * n + i_gate
        h_new = _sigmoid(o_raw) * c_new / n_new
        if HAS_MASK:
            keep = tl.load(MASK + rows * T + t, mask=row_ok, other=0) != 0
            keep2 = keep[:, None]
            h_new = tl.where(keep2, h_new, h)
            c_new = tl.where(keep2, c_new, c)
            n_new = tl.where(keep2, n_new, n)
            m_new = tl.where(keep2, m_new, m)
        h, c, n, m = h_new, c_new, n_new, m_new
        s_off = ((rows[:, None] * (T + 1) + t + 1) * NH + h_idx) * DH + d[None, :]
        tl.store(STATES + 0 * splane + s_off, h, mask=rd_ok)
        tl.store(STATES + 1 * splane + s_off, c, mask=rd_ok)
        tl.store(STATES + 2 * splane + s_off, n, mask=rd_ok)
        tl.store(STATES + 3 * splane + s_off, m, mask=rd_ok)


@triton.jit
def _slstm_bwd_kernel(
    X, R, BIAS, STATES, MASK, DOUT, DFINAL,  # DOUT (B, T, NH, DH); DFINAL (3, B, NH, DH): dh, dc, dn of the final state
    DX, DR_PART, DB_PART, DS0,  # DX like X; DR_PART (n_tiles, NH, DH, 4, DH); DB_PART (n_tiles, NH, 4, DH); DS0 (4, B, NH, DH)
    B, T, NH: tl.constexpr, DH: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h_idx = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    d_ok = d < DH
    rd_ok = row_ok[:, None] & d_ok[None, :]
    rr_ok = d_ok[:, None] & d_ok[None, :]
    # recurrent matrices of this head, kept on chip for the whole sequence, and its biases
    r_i, r_f, r_z, r_o, b_i, b_f, b_z, b_o = _load_head(R, BIAS, h_idx, d, d_ok, rr_ok, DH)

    state_off = rows[:, None] * NH * DH + h_idx * DH + d[None, :]
    plane = B * NH * DH
    dh = tl.load(DFINAL + 0 * plane + state_off, mask=rd_ok, other=0.0)
    dc = tl.load(DFINAL + 1 * plane + state_off, mask=rd_ok, other=0.0)
    dn = tl.load(DFINAL + 2 * plane + state_off, mask=rd_ok, other=0.0)
    dr_i = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    dr_f = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    dr_z = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    dr_o = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    db_i = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_f = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_o = tl.zeros((BLOCK_D,), dtype=tl.float32)

    splane = B * (T + 1) * NH * DH
    for step in range(T):
        t = T - 1 - step
        prev_off = ((rows[:, None] * (T + 1) + t) * NH + h_idx) * DH + d[None, :]
        cur_off = prev_off + NH * DH
        h_prev = tl.load(STATES + 0 * splane + prev_off, mask=rd_ok, other=0.0)
        c_prev = tl.load(STATES + 1 * splane + prev_off, mask=rd_ok, other=0.0)
        n_prev = tl.load(STATES + 2 * splane + prev_off, mask=rd_ok, other=0.0)
        m_prev = tl.load(STATES + 3 * splane + prev_off, mask=rd_ok, other=0.0)
        c_cur = tl.load(STATES + 1 * splane + cur_off, mask=rd_ok, other=0.0)
        n_cur = tl.load(STATES + 2 * splane + cur_off, mask=rd_ok, other=1.0)
        m_cur = tl.load(STATES + 3 * splane + cur_off, mask=rd_ok, other=0.0)
        x_off = ((rows[:, None] * T + t) * NH + h_idx) * 4 * DH + d[None, :]
        # recomputed rather than stored: one matmul per gate is cheaper than 4x the memory traffic
        i_raw, f_raw, z_raw, o_raw = _preactivations(X + x_off, rd_ok, DH, h_prev, r_i, r_f, r_z, r_o,
                                                     b_i, b_f, b_z, b_o)
        i_gate = tl.exp(i_raw - m_cur)
        f_gate = tl.exp(m_prev + _log_sigmoid(f_raw) - m_cur)
        z_val = _tanh(z_raw)
        o_gate = _sigmoid(o_raw)

        dh += tl.load(DOUT + ((rows[:, None] * T + t) * NH + h_idx) * DH + d[None, :], mask=rd_ok, other=0.0)
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
            keep = (tl.load(MASK + rows * T + t, mask=row_ok, other=0) != 0)[:, None]
            di_raw = tl.where(keep, di_raw, 0.0)
            df_raw = tl.where(keep, df_raw, 0.0)
            dz_raw = tl.where(keep, dz_raw, 0.0)
            do_raw = tl.where(keep, do_raw, 0.0)
            dc_prev = tl.where(keep, dc_prev, dc)
            dn_prev = tl.where(keep, dn_prev, dn)
            dh_pass = tl.where(keep, 0.0, dh)
        else:
            dh_pass = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        di_raw = tl.where(rd_ok, di_raw, 0.0)
        df_raw = tl.where(rd_ok, df_raw, 0.0)
        dz_raw = tl.where(rd_ok, dz_raw, 0.0)
        do_raw = tl.where(rd_ok, do_raw, 0.0)
        tl.store(DX + x_off + 0 * DH, di_raw.to(DX.dtype.element_ty), mask=rd_ok)
        tl.store(DX + x_off + 1 * DH, df_raw.to(DX.dtype.element_ty), mask=rd_ok)
        tl.store(DX + x_off + 2 * DH, dz_raw.to(DX.dtype.element_ty), mask=rd_ok)
        tl.store(DX + x_off + 3 * DH, do_raw.to(DX.dtype.element_ty), mask=rd_ok)
        h_prev_t = tl.trans(h_prev)
        dr_i += tl.dot(h_prev_t, di_raw, input_precision="ieee")
        dr_f += tl.dot(h_prev_t, df_raw, input_precision="ieee")
        dr_z += tl.dot(h_prev_t, dz_raw, input_precision="ieee")
        dr_o += tl.dot(h_prev_t, do_raw, input_precision="ieee")
        db_i += tl.sum(di_raw, axis=0)
        db_f += tl.sum(df_raw, axis=0)
        db_z += tl.sum(dz_raw, axis=0)
        db_o += tl.sum(do_raw, axis=0)
        dh = dh_pass + tl.dot(di_raw, tl.trans(r_i), input_precision="ieee")
        dh += tl.dot(df_raw, tl.trans(r_f), input_precision="ieee")
        dh += tl.dot(dz_raw, tl.trans(r_z), input_precision="ieee")
        dh += tl.dot(do_raw, tl.trans(r_o), input_precision="ieee")
        dc, dn = dc_prev, dn_prev

    # gradients of the initial state; m_0 matters through the true state c_0 exp(m_0), n_0 exp(m_0)
    s0_off = (rows[:, None] * (T + 1) * NH + h_idx) * DH + d[None, :]
    c0 = tl.load(STATES + 1 * splane + s0_off, mask=rd_ok, other=0.0)
    n0 = tl.load(STATES + 2 * splane + s0_off, mask=rd_ok, other=0.0)
    tl.store(DS0 + 0 * plane + state_off, dh, mask=rd_ok)
    tl.store(DS0 + 1 * plane + state_off, dc, mask=rd_ok)
    tl.store(DS0 + 2 * plane + state_off, dn, mask=rd_ok)
    tl.store(DS0 + 3 * plane + state_off, dc * c0 + dn * n0, mask=rd_ok)
    dr_off = (tile * NH + h_idx) * DH * 4 * DH + d[:, None] * 4 * DH + d[None, :]
    tl.store(DR_PART + dr_off + 0 * DH, dr_i, mask=rr_ok)
    tl.store(DR_PART + dr_off + 1 * DH, dr_f, mask=rr_ok)
    tl.store(DR_PART + dr_off + 2 * DH, dr_z, mask=rr_ok)
    tl.store(DR_PART + dr_off + 3 * DH, dr_o, mask=rr_ok)
    db_off = (tile * NH + h_idx) * 4 * DH + d
    tl.store(DB_PART + db_off + 0 * DH, db_i, mask=d_ok)
    tl.store(DB_PART + db_off + 1 * DH, db_f, mask=d_ok)
    tl.store(DB_PART + db_off + 2 * DH, db_z, mask=d_ok)
    tl.store(DB_PART + db_off + 3 * DH, db_o, mask=d_ok)


MAX_HEAD_DIM = 64  # four DH x DH matrices per head stay in registers; beyond this they would spill


def _blocks(B: int, DH: int) -> tuple[int, int]:
    block_d = max(16, triton.next_power_of_2(DH))  # tl.dot needs every dimension >= 16
    block_b = 16 if B <= 16 else 32
    return block_b, block_d


# The kernels run inside two registered operators (`torch.library.custom_op`) with fake implementations, the
# backward registered as the forward's autograd formula: torch.compile traces through them without graph
# breaks, and `torch.library.opcheck` tests the registrations.
#
#     slstm_triton_forward(x, R, bias, h0, c0, n0, m0, mask) -> out (fp32), h_T, c_T, n_T, m_T, and for the
#         backward the states (4, B, T + 1, NH, DH): h, c, n, m before and after every step
#     slstm_triton_backward(x, R, bias, states, mask, d_out, d_h, d_c, d_n) -> dx, dR, db, dh0, dc0, dn0, dm0


@torch.library.custom_op("xlstm_hf::slstm_triton_forward", mutates_args=())
def _forward(x: torch.Tensor, recurrent_kernel: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor,
             c0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor, mask: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, NH, _, DH = x.shape
    x, recurrent_kernel, bias = x.contiguous(), recurrent_kernel.contiguous(), bias.contiguous()
    states = torch.empty(4, B, T + 1, NH, DH, device=x.device, dtype=torch.float32)
    states[:, :, 0] = torch.stack([h0, c0, n0, m0])
    mask_u8 = mask.to(torch.uint8).contiguous() if mask is not None else None
    block_b, block_d = _blocks(B, DH)
    grid = (NH, triton.cdiv(B, block_b))
    _slstm_fwd_kernel[grid](x, recurrent_kernel, bias, mask_u8, states, B, T, NH, DH,
                            HAS_MASK=mask is not None, BLOCK_B=block_b, BLOCK_D=block_d)
    final = states[:, :, T]
    # (copies: an operator's outputs may not alias each other)
    return states[0, :, 1:].clone(), final[0].clone(), final[1].clone(), final[2].clone(), final[3].clone(), states


@_forward.register_fake
def _(x, recurrent_kernel, bias, h0, c0, n0, m0, mask):
    B, T, NH, _, DH = x.shape
    new = lambda *shape: x.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (new(B, T, NH, DH), new(B, NH, DH), new(B, NH, DH), new(B, NH, DH), new(B, NH, DH),
            new(4, B, T + 1, NH, DH))


@torch.library.custom_op("xlstm_hf::slstm_triton_backward", mutates_args=())
def _backward(x: torch.Tensor, recurrent_kernel: torch.Tensor, bias: torch.Tensor, states: torch.Tensor,
              mask: torch.Tensor | None, d_out: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor,
              d_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    B, T, NH, _, DH = x.shape
    x, recurrent_kernel, bias = x.contiguous(), recurrent_kernel.contiguous(), bias.contiguous()
    mask_u8 = mask.to(torch.uint8).contiguous() if mask is not None else None
    block_b, block_d = _blocks(B, DH)
    tiles = triton.cdiv(B, block_b)
    # the gradient of the final m is not needed: m only stabilises (see the module docstring)
    d_final = torch.stack([d_h.float(), d_c.float(), d_n.float()]).contiguous()
    d_out = d_out.float().contiguous()
    dx = torch.empty_like(x)
    dr_part = torch.zeros(tiles, NH, DH, 4, DH, device=x.device, dtype=torch.float32)
    db_part = torch.zeros(tiles, NH, 4, DH, device=x.device, dtype=torch.float32)
    ds0 = torch.empty(4, B, NH, DH, device=x.device, dtype=torch.float32)
    _slstm_bwd_kernel[(NH, tiles)](x, recurrent_kernel, bias, states, mask_u8, d_out, d_final,
                                   dx, dr_part, db_part, ds0, B, T, NH, DH,
                                   HAS_MASK=mask is not None, BLOCK_B=block_b, BLOCK_D=block_d)
    dr = dr_part.sum(0).to(recurrent_kernel.dtype)
    db = db_part.sum(0).to(bias.dtype)
    return dx, dr, db, ds0[0].clone(), ds0[1].clone(), ds0[2].clone(), ds0[3].clone()


@_backward.register_fake
def _(x, recurrent_kernel, bias, states, mask, d_out, d_h, d_c, d_n):
    state = lambda: states.new_empty(states.shape[1:2] + states.shape[3:])  # noqa: E731 (B, NH, DH)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(recurrent_kernel, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format), state(), state(), state(), state())


def _setup_context(ctx, inputs, output):
    x, recurrent_kernel, bias, *_, mask = inputs
    ctx.save_for_backward(x, recurrent_kernel, bias, output[-1], mask)
    ctx.mark_non_differentiable(output[4], output[5])  # m (a stabiliser) and the saved states


def _autograd(ctx, d_out, d_h, d_c, d_n, *_):
    x, recurrent_kernel, bias, states, mask = ctx.saved_tensors
    zeros = lambda: states.new_zeros(states.shape[1:2] + states.shape[3:])  # noqa: E731
    d_out = states.new_zeros(states[0, :, 1:].shape) if d_out is None else d_out
    grads = torch.ops.xlstm_hf.slstm_triton_backward(
        x, recurrent_kernel, bias, states, mask, d_out, zeros() if d_h is None else d_h,
        zeros() if d_c is None else d_c, zeros() if d_n is None else d_n)
    return (*grads, None)


_forward.register_autograd(_autograd, setup_context=_setup_context)


def slstm_recurrent_triton(x, recurrent_kernel, bias, initial_state=None, output_final_state=False, mask=None):
    """`xlstm_hf.cells.slstm_recurrent` as one fused Triton kernel per direction (same signature).

    Head dims up to MAX_HEAD_DIM; larger heads fall back to the torch backend's sLSTM (the reference with
    its backward over time written out) with a warning."""
    B, T, NH, _, DH = x.shape
    if DH > MAX_HEAD_DIM:  # R would not fit on chip: the torch backend does the job
        from xlstm_hf.slstm_autograd import slstm_recurrent_bptt

        warnings.warn(f"the Triton sLSTM kernel supports head dims up to {MAX_HEAD_DIM}, got {DH}: "
                      "using the PyTorch sLSTM", stacklevel=2)
        return slstm_recurrent_bptt(x, recurrent_kernel, bias, initial_state, output_final_state, mask)
    if initial_state is None:
        zeros = torch.zeros(B, NH, DH, device=x.device, dtype=torch.float32)
        initial_state = (zeros, zeros, zeros, torch.full_like(zeros, float("-inf")))
    out, *final = torch.ops.xlstm_hf.slstm_triton_forward(x, recurrent_kernel, bias, *initial_state, mask)[:5]
    return out.to(x.dtype), (tuple(final) if output_final_state else None)
