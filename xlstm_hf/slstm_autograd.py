"""The sLSTM recurrence as a custom operator with its backward over time written out by hand.

`slstm_recurrent_bptt` computes the same function as `cells.slstm_recurrent` (same signature, conventions
and gradients) and is faster to train on CPU: autograd through the reference records ~15 small operations
per time step and replays each of them, with its bookkeeping, in the backward pass. Here the forward runs
without recording (one in-place batched matmul and `cells.slstm_pointwise` per step, the reference's own
code), and the backward walks back over time with six batched operations per step over (NH, B):

    dh_t            = dout_t + draw_{t+1} R^T (+ dh_{t+1} where step t+1 was padding)     one baddbmm
    (dc_t, dn_t)   += dh_t (o/n, -o c/n^2)                                                one addcmul
    draw_t (i,f,z)  = sum over (dc_t, dn_t) of their coefficients                         a product, a sum
    draw_t (o)      = dh_t c/n o (1 - o)                                                  one product
    (dc, dn)_{t-1}  = (dc_t, dn_t) f_t                                                    one product

All per-step coefficients (the derivatives of the stabilised exponential gating: i, f, tanh z, sigmoid o
and c, n of both ends of the step) are computed beforehand, vectorised over a block of time steps. The
gradients of x and the bias are then the stacked draw_t, and that of R one batched matmul over all steps,
sum_t h_{t-1}^T draw_t, as in `kernels/slstm.py`'s backward.

What the forward saves (and why): the gate pre-activations of every step, raw_t = x_t + b + h_{t-1} R
(T, NH, B, 4, DH), and the states h, c, n, m of every step (T+1, NH, B, DH each). The pre-activations cost
nothing to keep: the forward computes them in place in the buffer that is saved (x + b is laid out
time-major once, and each step adds h_{t-1} R into its slice). Keeping only the states and recomputing
the pre-activations would save memory (4 DH instead of 8 DH values per unit and step), but the recompute
is a matmul as large as the forward's (a third more floating-point work over forward + backward at the
125M model's DH = 192); on CPU time is the scarce resource, and 8 DH per unit and step is still less than
autograd keeps for the reference (an input or output for each of its ~15 operations per step). The
states cannot be recomputed without another loop over time, so they are kept either way.

Stabiliser: as in the reference, m is a constant for autograd, so gradients are those with m held fixed
(exact for the outputs h); an initial m still gets the reference's gradient, dc_0 c_0 + dn_0 n_0 at the
first real step (and the final m's gradient where every step of a row is padding, which passes m through).
"""

import torch
import torch.nn.functional as F

from .cells import autocast_off, float32_compute, slstm_pointwise, slstm_recurrent, slstm_zero_state

#: time steps whose backward coefficients are computed together, just before the steps that use them:
#: large enough for that vectorised work to be a few large operations, small enough that the coefficients
#: (9 DH values per unit and step) are still in cache when used (B=8, DH=192, T=512 on CPU: the backward
#: took ~205 ms with blocks of 8, ~213 with 32, ~260 with 128; B=1: 85, 75, 80 ms)
COEFFICIENT_BLOCK = 32


def _backward_coefficients(raw, cs, ns, ms, keep):
    """Coefficients of the backward steps for a block of L steps, coefficient-major: (9, NH, L, B, DH).

    raw: (NH, L, B, 4, DH) pre-activations; cs, ns, ms: (NH, L+1, B, DH) the states at both ends of the
    steps; keep: (1, L, B, 1) bool or None. Along dim 0 of the result:
    - 0:2 d(c_t, n_t) / d h_t through h_t = o c_t / n_t: (o / n, -o c / n^2);
    - 2:5 d(i~, f~, z~) / d c_t: (i tanh z, c_{t-1} f sigmoid(-f~), i (1 - tanh^2 z));
    - 5:7 d(i~, f~) / d n_t: (i, n_{t-1} f sigmoid(-f~));
    - 7   d o~ / d h_t: c / n o (1 - o);
    - 8   d(c_{t-1}, n_{t-1}) / d(c_t, n_t): the forget gate f.
    Coefficient-major so that every operation here runs over contiguous memory (with the gate axis inside,
    a head dim of 16 would cut each into loops of 16 values). Padded steps get zero coefficients and f = 1
    (the state passes through), set with masked_fill, not a product with the mask: their values may be
    inf or nan (e.g. before the first real token)."""
    NH, L, B, _, DH = raw.shape
    i_raw, f_raw, z_raw, o_raw = raw.permute(3, 0, 1, 2, 4).contiguous()  # each (NH, L, B, DH)
    c_prev, c_cur, n_prev, n_cur = cs[:, :-1], cs[:, 1:], ns[:, :-1], ns[:, 1:]
    m_prev, m_cur = ms[:, :-1], ms[:, 1:]
    coef = raw.new_empty(9, NH, L, B, DH)
    # the gates exactly as slstm_pointwise computed them (m_cur is its max(i~, log f + m_{t-1}), detached)
    i_gate = torch.sub(i_raw, m_cur, out=coef[5]).exp_()
    f_gate = torch.add(m_prev, F.logsigmoid(f_raw), out=coef[8]).sub_(m_cur).exp_()
    z = torch.tanh(z_raw)
    o = torch.sigmoid(o_raw)
    c_over_n = c_cur / n_cur
    f_sig = torch.sigmoid(f_raw.neg_()).mul_(f_gate)  # d f / d f~ (d log sigmoid(x) / dx = sigmoid(-x))
    o_over_n = torch.div(o, n_cur, out=coef[0])
    torch.mul(o_over_n, c_over_n, out=coef[1]).neg_()
    torch.mul(z, i_gate, out=coef[2])
    torch.mul(c_prev, f_sig, out=coef[3])
    torch.mul(z, z, out=coef[4]).neg_().add_(1.0).mul_(i_gate)
    torch.mul(n_prev, f_sig, out=coef[6])
    torch.mul(o, o.neg().add_(1.0), out=coef[7]).mul_(c_over_n)
    if keep is not None:
        padded = ~keep  # (1, L, B, 1)
        coef[:8].masked_fill_(padded, 0.0)
        coef[8].masked_fill_(padded, 1.0)
    return coef


# The sLSTM over a sequence in the compute dtype, head-major, as two custom operators (`torch.library`):
# opaque to torch.compile, which would otherwise unroll the loop over time (minutes of compiling, a graph
# per length), and with the backward registered as the forward's autograd formula.
#
#     slstm_forward(x (B, T, NH, 4, DH), R (NH, DH, 4, DH), bias (NH, 4, DH), h0, c0, n0, m0 (NH, B, DH each),
#                   keep (1, T, B, 1) bool or None)
#         -> h (NH, T, B, DH), h_T, c_T, n_T, m_T (NH, B, DH each), and what the backward needs: raw, hs, cs, ns, ms
#
# All tensors in one dtype (float32 or float64); `slstm_recurrent_bptt` is the user-facing wrapper.
# Head-major buffers (NH, T, B, ...): each step is a strided slice, and the gradient of R is one batched
# matmul over (NH, T*B) without a copy.


def _fused_kernels(t: torch.Tensor):
    """xlstm_hf's fused CPU step kernels (`kernels/cpu.py`) if they can take `t`, else None. Absent where only
    a checkpoint's copied model code runs (without the xlstm_hf package), or where they cannot be built."""
    try:  # (a try block: transformers' import check for copied code skips it; the kernels are optional)
        from xlstm_hf.kernels import cpu
    except ImportError:
        return None
    return cpu if cpu.available(t) else None


def _cpu_forward(kernels, x, recurrent_kernel, bias, h0, c0, n0, m0, keep, every_state):
    """The forward with the fused CPU steps: raw (NH, T, B, 4, DH) and the state buffers (NH, S, B, DH) of
    h (S = T+1) and of c, n, m (S = T+1 with `every_state`, else two alternating slots)."""
    B, T, NH, G, DH = x.shape
    raw = (x + bias).permute(2, 1, 0, 3, 4).contiguous()  # (NH, T, B, 4, DH)
    slots = T + 1 if every_state else 2
    hs = x.new_empty(NH, T + 1, B, DH)
    cs, ns, ms = (x.new_empty(NH, slots, B, DH) for _ in range(3))
    for buffer, first in ((hs, h0), (cs, c0), (ns, n0), (ms, m0)):
        buffer[:, 0] = first
    kernels.slstm_forward_loop(raw, recurrent_kernel, hs, cs, ns, ms, None if keep is None else keep.view(T, B))
    return raw, hs, cs, ns, ms


@torch.library.custom_op("xlstm_hf::slstm_forward", mutates_args=())
def slstm_forward(x: torch.Tensor, recurrent_kernel: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor,
                  c0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor, keep: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, NH, G, DH = x.shape
    kernels = _fused_kernels(x)
    with torch.no_grad():
        if kernels is not None:
            raw, hs, cs, ns, ms = _cpu_forward(kernels, x, recurrent_kernel, bias, h0, c0, n0, m0, keep, True)
            return hs[:, 1:].clone(), *(s[:, -1].clone() for s in (hs, cs, ns, ms)), raw, hs, cs, ns, ms
        # the saved pre-activations: x + b laid out head-major, each step adds h_{t-1} R in place
        raw = (x + bias).permute(2, 1, 0, 3, 4).contiguous()  # (NH, T, B, 4, DH)
        raw_steps, raw_flat = raw.unbind(1), raw.view(NH, T, B, G * DH).unbind(1)
        r = recurrent_kernel.reshape(NH, DH, G * DH)
        keeps = [None] * T if keep is None else keep.unbind(1)  # each (1, B, 1)
        h, c, n, m = h0, c0, n0, m0
        hs, cs, ns, ms = [h], [c], [n], [m]
        for raw_t, flat_t, keep_t in zip(raw_steps, raw_flat, keeps):
            flat_t.baddbmm_(h, r)
            h_new, c_new, n_new, m_new = slstm_pointwise(raw_t, c, n, m)
            if keep_t is not None:
                h_new, c_new, n_new, m_new = (torch.where(keep_t, a, b) for a, b in
                                              ((h_new, h), (c_new, c), (n_new, n), (m_new, m)))
            h, c, n, m = h_new, c_new, n_new, m_new
            hs.append(h)
            cs.append(c)
            ns.append(n)
            ms.append(m)
        hs, cs, ns, ms = (torch.stack(s, 1) for s in (hs, cs, ns, ms))  # (NH, T+1, B, DH)
    # copies, not views of the saved states (a caller's in-place change would break the backward)
    return hs[:, 1:].clone(), h.clone(), c.clone(), n.clone(), m.clone(), raw, hs, cs, ns, ms


@slstm_forward.register_fake
def _(x, recurrent_kernel, bias, h0, c0, n0, m0, keep):
    B, T, NH, G, DH = x.shape
    states = [x.new_empty(NH, T + 1, B, DH) for _ in range(4)]
    return (x.new_empty(NH, T, B, DH), *(x.new_empty(NH, B, DH) for _ in range(4)), x.new_empty(NH, T, B, G, DH),
            *states)


@torch.library.custom_op("xlstm_hf::slstm_backward", mutates_args=())
def slstm_backward(raw: torch.Tensor, recurrent_kernel: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor,
                   ns: torch.Tensor, ms: torch.Tensor, keep: torch.Tensor | None, d_out: torch.Tensor,
                   d_hT: torch.Tensor, d_cT: torch.Tensor, d_nT: torch.Tensor, d_mT: torch.Tensor, need_dr: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor]:
    """The gradients (dx, dR, dbias, dh0, dc0, dn0, dm0) from those of the outputs (see the module docstring);
    dR is zeros without `need_dr` (a frozen R, as under LoRA: its matmul over all steps is skipped)."""
    with autocast_off(raw.device.type):  # float32, as in the forward
        NH, T, B, G, DH = raw.shape
        zeros = hs.new_zeros(NH, B, DH)
        r_t = recurrent_kernel.reshape(NH, DH, G * DH).transpose(1, 2).contiguous()  # (NH, 4 DH, DH)
        pass_h = None if keep is None else (~keep).to(hs.dtype).unbind(1)  # dh_t passes back over padding
        d_outs = d_out.unbind(1)

        d_raw = torch.empty_like(raw)  # (NH, T, B, 4, DH): the gradients of the pre-activations
        # per-step views of it: the (i, f, z) and (i, f) parts gate-major (3 or 2, NH, B, DH), o, all four flat
        d_ifz = d_raw[:, :, :, :3].permute(1, 3, 0, 2, 4).unbind(0)
        d_if = d_raw[:, :, :, :2].permute(1, 3, 0, 2, 4).unbind(0)
        d_o = d_raw[:, :, :, 3].unbind(1)
        d_flat = d_raw.view(NH, T, B, G * DH).unbind(1)
        dh = d_outs[T - 1] + d_hT
        dcn = torch.stack((d_cT, d_nT))  # (2, NH, B, DH): the gradients of (c_t, n_t) from later steps
        kernels = _fused_kernels(raw)
        if kernels is not None:  # contiguous operands for the fused step
            dh, d_out = dh.contiguous(), d_out.contiguous()
            dh_prev = torch.empty_like(dh, memory_format=torch.contiguous_format)
            keep_steps = None if keep is None else keep.reshape(T, B)
        for start in reversed(range(0, T, COEFFICIENT_BLOCK)):
            stop = min(start + COEFFICIENT_BLOCK, T)
            coef = _backward_coefficients(raw[:, start:stop], cs[:, start:stop + 1], ns[:, start:stop + 1],
                                          ms[:, start:stop + 1], None if keep is None else keep[:, start:stop])
            bc, kc, kn = (v.unbind(2) for v in (coef[0:2], coef[2:5], coef[5:7]))  # per step (k, NH, B, DH)
            a, f = coef[7].unbind(1), coef[8].unbind(1)  # per step (NH, B, DH)
            for t in reversed(range(start, stop)):
                j = t - start
                if kernels is not None:  # the same step fused (kernels/cpu_kernels.c); dh is overwritten in place
                    kernels.slstm_backward_step(coef, j, dh, dcn, d_raw, t, d_out, dh_prev, keep_steps)
                    torch.baddbmm(dh_prev, d_flat[t], r_t, out=dh)
                    continue
                dcn_t = torch.addcmul(dcn, dh, bc[j])  # total gradients of c_t, n_t
                dc_t, dn_t = dcn_t.unbind(0)
                torch.mul(kc[j], dc_t, out=d_ifz[t])
                d_if[t].addcmul_(kn[j], dn_t)
                torch.mul(dh, a[j], out=d_o[t])
                dcn = dcn_t * f[j]
                dh_prev = d_outs[t - 1] if t > 0 else zeros
                if pass_h is not None:
                    dh_prev = torch.addcmul(dh_prev, dh, pass_h[t])
                dh = torch.baddbmm(dh_prev, d_flat[t], r_t)

        dc0, dn0 = dcn[0].clone(), dcn[1].clone()  # (an operator's outputs may not share memory)
        # m_0 acts through the first real step's forget gate: dc_t c_0 f + dn_t n_0 f, and dcn is now
        # (dc_t f, dn_t f); a row that is all padding passes the final m's gradient through instead
        dm0 = dc0 * cs[:, 0] + dn0 * ns[:, 0]
        if keep is not None:
            dm0 = torch.where(keep.any(1), dm0, d_mT)
        dx = d_raw.permute(2, 1, 0, 3, 4)  # (B, T, NH, 4, DH)
        d_bias = d_raw.sum((1, 2))
        d_r = torch.zeros_like(recurrent_kernel)
        if need_dr:  # sum_t h_{t-1}^T draw_t: one batched matmul over all steps
            h_prev = hs[:, :-1].reshape(NH, T * B, DH)
            d_r = torch.bmm(h_prev.transpose(1, 2), d_raw.view(NH, T * B, G * DH)).view(NH, DH, G, DH)
        return dx.contiguous(), d_r, d_bias, dh, dc0, dn0, dm0


@slstm_backward.register_fake
def _(raw, recurrent_kernel, hs, cs, ns, ms, keep, d_out, d_hT, d_cT, d_nT, d_mT, need_dr):
    NH, T, B, G, DH = raw.shape
    return (raw.new_empty(B, T, NH, G, DH), torch.empty_like(recurrent_kernel), raw.new_empty(NH, G, DH),
            *(raw.new_empty(NH, B, DH) for _ in range(4)))


def _setup_context(ctx, inputs, output):
    keep = inputs[7]
    ctx.save_for_backward(inputs[1], *output[5:], keep)
    # the saved buffers and the final m are not differentiable outputs (the final m depends on the inputs
    # only through a padded row's initial m, as in the reference)
    ctx.mark_non_differentiable(*output[5:], *(() if keep is not None else output[4:5]))


def _backward(ctx, d_out, d_hT, d_cT, d_nT, d_mT, *_buffers):
    recurrent_kernel, raw, hs, cs, ns, ms, keep = ctx.saved_tensors
    NH, T, B, _, DH = raw.shape
    zeros = lambda: hs.new_zeros(NH, B, DH)  # noqa: E731
    d_out = torch.zeros_like(hs[:, 1:]) if d_out is None else d_out
    d_hT, d_cT, d_nT, d_mT = (zeros() if g is None else g for g in (d_hT, d_cT, d_nT, d_mT))
    dx, d_r, *grads = torch.ops.xlstm_hf.slstm_backward(raw, recurrent_kernel, hs, cs, ns, ms, keep, d_out, d_hT,
                                                        d_cT, d_nT, d_mT, bool(ctx.needs_input_grad[1]))
    return (dx, d_r if ctx.needs_input_grad[1] else None, *grads, None)


slstm_forward.register_autograd(_backward, setup_context=_setup_context)


@float32_compute
def slstm_recurrent_bptt(x, recurrent_kernel, bias, initial_state=None, output_final_state=False, mask=None):
    """`cells.slstm_recurrent` (same signature, outputs and gradients) with a hand-written backward, and
    on CPU the fused step kernels of `kernels/cpu.py` (forward and backward).

    Without gradients to compute (inference, or no input requiring grad) it runs the forward alone and
    keeps nothing for a backward pass (except under torch.compile): the fused kernels or the reference."""
    inputs = (x, recurrent_kernel, bias, *(initial_state or ()))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    compiling = torch.compiler.is_compiling()
    out_dtype = x.dtype
    B, T, NH, _, DH = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    # conversions and layout changes outside the operator: autograd takes their gradients back
    x_c, recurrent_kernel_c, bias_c = (t.to(dtype) for t in (x, recurrent_kernel, bias))
    kernels = None if compiling else _fused_kernels(x_c)
    # without gradients: the fused forward on CPU, else the reference (which keeps nothing either); under
    # torch.compile the operator serves sequences, where the reference's loop would be unrolled, and a single
    # step (decoding) stays the reference, which the compiler fuses
    if not needs_grad and (T == 1 if compiling else kernels is None):
        return slstm_recurrent(x, recurrent_kernel, bias, initial_state, output_final_state, mask)
    state = initial_state if initial_state is not None else slstm_zero_state(B, NH, DH, x.device, dtype)
    h0, c0, n0, m0 = (s.to(dtype).transpose(0, 1) for s in state)  # (NH, B, DH)
    keep = None if mask is None else mask.T[None, :, :, None].contiguous()  # (1, T, B, 1)
    if not needs_grad and not compiling:  # the fused forward, keeping no per-step states
        _, hs, cs, ns, ms = _cpu_forward(kernels, x_c, recurrent_kernel_c, bias_c, h0, c0, n0, m0, keep, False)
        out = hs[:, 1:].permute(2, 1, 0, 3).to(out_dtype)  # (B, T, NH, DH)
        final = (hs[:, -1], *(s[:, T % 2] for s in (cs, ns, ms)))  # (c, n, m alternate between two slots)
        return out, (tuple(s.transpose(0, 1) for s in final) if output_final_state else None)
    out, *final = torch.ops.xlstm_hf.slstm_forward(x_c, recurrent_kernel_c, bias_c, h0, c0, n0, m0, keep)[:5]
    out = out.permute(2, 1, 0, 3).to(out_dtype)  # (B, T, NH, DH)
    return out, (tuple(s.transpose(0, 1) for s in final) if output_final_state else None)
