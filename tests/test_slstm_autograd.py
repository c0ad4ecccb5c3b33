"""`slstm_recurrent_bptt` (the sLSTM as custom operators with a hand-written backward over time) against
autograd through the reference `cells.slstm_recurrent`. Every test runs twice: with the fused CPU step
kernels (`kernels/cpu_kernels.c`) and with the PyTorch steps that are their fallback.

Tolerances: in float64 the two differ only by rounding in a different order (relative 1e-10, measured
per tensor against its largest entry, is ample). In float32 the Function must be as accurate as the
reference itself: its error against the float64 reference at most twice the float32 reference's own
(plus 1e-6 relative for entries where both are at rounding level).
"""

import pytest
import torch

from xlstm_hf.cells import slstm_recurrent
from xlstm_hf import slstm_autograd
from xlstm_hf.slstm_autograd import slstm_recurrent_bptt


@pytest.fixture(autouse=True, params=["fused", "torch"])
def steps(request, monkeypatch):
    """The per-step implementation under test: the C kernels (which must build here: CI has a compiler),
    or the PyTorch steps (kernels off, as on a machine without a compiler or on other devices)."""
    from xlstm_hf.kernels import cpu

    if request.param == "fused":
        assert cpu.library() is not None, "the fused CPU sLSTM kernels failed to build"
    else:
        monkeypatch.setattr(slstm_autograd, "_fused_kernels", lambda t: None)
    return request.param


def rel_err(a, b):
    """Largest difference relative to b's largest finite entry; equal entries (also -inf: the m of a row
    that has seen no token) count as no difference."""
    a, b = a.double(), b.double()
    diff = torch.where(a == b, 0.0, a - b).abs().max()
    return (diff / torch.where(torch.isfinite(b), b, 0.0).abs().max().clamp_min(1e-30)).item()


def make_inputs(B, T, NH, DH, dtype=torch.float64, seed=0, gate_offset=None, with_state=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = r(B, T, NH, 4, DH)
    if gate_offset is not None:  # (i, f, z, o) offsets, e.g. large input gates
        x = x + torch.tensor(gate_offset, dtype=dtype)[:, None]
    R, b = 0.5 * r(NH, DH, 4, DH) / DH ** 0.5 * 2, r(NH, 4, DH)
    state = None
    if with_state:  # a state as a previous call leaves it: n > 0, |c| <= n, finite m
        n = 0.5 + r(B, NH, DH).abs()
        state = (torch.tanh(r(B, NH, DH)), n * torch.tanh(r(B, NH, DH)), n, r(B, NH, DH))
    return x, R, b, state


def run(fn, x, R, b, state, mask, final, weights):
    """Outputs and gradients of a weighted loss over the output and (when `final`) the final state."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, R, b, *(state or ()))]
    out, fin = fn(leaves[0], leaves[1], leaves[2], tuple(leaves[3:]) or None, final, mask)
    loss = (out * weights[0]).sum()
    if final:
        for s, w in zip(fin, weights[1:]):
            if s.requires_grad:  # the final m only where the reference makes it depend on the inputs
                loss = loss + (s * w).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return (out, *(fin or ())), grads


def loss_weights(B, T, NH, DH, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, NH, DH, generator=g, dtype=dtype)] + \
        [torch.randn(B, NH, DH, generator=g, dtype=dtype) for _ in range(4)]


def compare(x, R, b, state=None, mask=None, final=True, tol=1e-10):
    B, T, NH, _, DH = x.shape
    weights = loss_weights(B, T, NH, DH, x.dtype)
    outs_ref, grads_ref = run(slstm_recurrent, x, R, b, state, mask, final, weights)
    outs, grads = run(slstm_recurrent_bptt, x, R, b, state, mask, final, weights)
    for name, got, want in zip(("out", "h", "c", "n", "m"), outs, outs_ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel_err(got, want) <= tol, name
    for name, got, want in zip(("x", "R", "b", "h0", "c0", "n0", "m0"), grads, grads_ref):
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.isfinite(got).all(), name
            assert rel_err(got, want) <= tol, (name, rel_err(got, want))


@pytest.mark.parametrize("T", [1, 7, 40])
@pytest.mark.parametrize("NH,DH", [(1, 8), (3, 5), (4, 16)])
def test_matches_reference_float64(T, NH, DH):
    compare(*make_inputs(3, T, NH, DH)[:3])


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_initial_and_final_state(with_state, final):
    x, R, b, state = make_inputs(2, 7, 3, 5, with_state=with_state)
    compare(x, R, b, state, final=final)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [7, 40])
def test_padding_mask(T, with_state):
    """Left padding, holes, a row that is padding throughout (its final state, m included, is the initial
    state) and a row without padding."""
    x, R, b, state = make_inputs(4, T, 3, 5, with_state=with_state)
    mask = torch.ones(4, T, dtype=torch.bool)
    mask[0, : T // 2] = False  # left padding
    mask[1, 1::3] = False  # holes
    mask[1, 0] = False
    mask[2] = False  # all padding
    compare(x, R, b, state, mask)


@pytest.mark.parametrize("gates", [(30.0, 0.0, 0.0, 0.0), (-30.0, 0.0, 0.0, 0.0), (60.0, 30.0, 0.0, 5.0),
                                   (-60.0, -30.0, 3.0, -5.0), (0.0, 30.0, 0.0, 0.0)])
def test_extreme_gate_preactivations(gates):
    """Large positive or negative input gates (exp(i~) overflows without the stabiliser), saturated forget
    and output gates."""
    x, R, b, state = make_inputs(3, 20, 2, 8, gate_offset=gates, with_state=True)
    compare(x, R, b, state)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[0, :5] = False
    compare(x, R, b, None, mask)


def test_float32_as_accurate_as_reference():
    x, R, b, state = make_inputs(3, 40, 4, 16, with_state=True)
    weights = loss_weights(3, 40, 4, 16, torch.float64)
    exact_outs, exact_grads = run(slstm_recurrent, x, R, b, state, None, True, weights)
    args32 = [t.float() for t in (x, R, b)] + [tuple(t.float() for t in state), None, True, [w.float() for w in weights]]
    ref_outs, ref_grads = run(slstm_recurrent, *args32)
    outs, grads = run(slstm_recurrent_bptt, *args32)
    assert outs[0].dtype == torch.float32 and grads[0].dtype == torch.float32
    for got, ref, exact in zip((*outs, *grads), (*ref_outs, *ref_grads), (*exact_outs, *exact_grads)):
        assert rel_err(got, exact) <= 2 * rel_err(ref, exact) + 1e-6


def test_low_precision_input_dtype():
    """bfloat16 inputs: computed in float32, output and gradients in bfloat16 (as the reference)."""
    x, R, b, _ = make_inputs(2, 7, 2, 8, dtype=torch.float32)
    x = x.bfloat16()
    compare_outs = []
    for fn in (slstm_recurrent, slstm_recurrent_bptt):
        xl = x.detach().clone().requires_grad_()
        out, _ = fn(xl, R, b)
        (gx,) = torch.autograd.grad(out.float().square().sum(), xl)
        assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
        compare_outs.append((out, gx))
    (o1, g1), (o2, g2) = compare_outs
    assert rel_err(o1, o2) < 1e-2 and rel_err(g1, g2) < 2e-2


def gradcheck_case(fast_mode):
    """Finite differences of the true function: the outputs h and the final h (which do not depend on the
    stabiliser), for every input including a finite initial m, with a padding mask."""
    x, R, b, state = make_inputs(2, 4, 2, 3, with_state=True)
    mask = torch.tensor([[False, True, True, False], [True, True, False, True]])

    def f(x, R, b, h0, c0, n0, m0):
        out, fin = slstm_recurrent_bptt(x, R, b, (h0, c0, n0, m0), True, mask)
        return out, fin[0]

    inputs = tuple(t.detach().clone().requires_grad_() for t in (x, R, b, *state))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=fast_mode)


def test_gradcheck_tiny():
    gradcheck_case(fast_mode=True)  # random projections of the Jacobian: a few evaluations


@pytest.mark.slow
def test_gradcheck_tiny_full_jacobian():
    gradcheck_case(fast_mode=False)  # every column of the Jacobian (~700 evaluations)


@pytest.mark.parametrize("padded", [False, True])
def test_inference(steps, padded):
    """Without gradients nothing is kept for a backward pass: the fused forward (within float64 rounding)
    or the reference itself (bitwise); also with an initial state and padding, in float32."""
    x, R, b, state = make_inputs(3, 9, 2, 5, with_state=True)
    mask = None
    if padded:
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[0, :4] = False
        mask[1, 2::3] = False
    for dtype in (torch.float64, torch.float32):
        args = [t.to(dtype) for t in (x, R, b)], tuple(t.to(dtype) for t in state)
        out, fin = slstm_recurrent_bptt(*args[0], args[1], True, mask)
        ref, ref_fin = slstm_recurrent(*args[0], args[1], True, mask)
        tol = 0 if steps == "torch" else (1e-12 if dtype == torch.float64 else 1e-5)
        for got, want in zip((out, *fin), (ref, *ref_fin)):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert rel_err(got, want) <= tol


def test_final_m_is_constant_without_mask():
    """As in the reference, the final m does not require grad unless a mask can pass the initial m through."""
    x, R, b, state = make_inputs(2, 5, 2, 4, with_state=True)
    state = tuple(t.requires_grad_() for t in state)
    _, fin = slstm_recurrent_bptt(x, R, b, state, True)
    _, ref_fin = slstm_recurrent(x, R, b, state, True)
    assert fin[3].requires_grad == ref_fin[3].requires_grad is False
    mask = torch.ones(2, 5, dtype=torch.bool)
    _, fin = slstm_recurrent_bptt(x, R, b, state, True, mask)
    _, ref_fin = slstm_recurrent(x, R, b, state, True, mask)
    assert fin[3].requires_grad == ref_fin[3].requires_grad is True


def test_returned_tensors_do_not_alias_saved_state():
    """Changing the returned output in place does not change the gradients (the Function returns copies)."""
    x, R, b, _ = make_inputs(2, 6, 2, 4)
    x.requires_grad_()
    out, fin = slstm_recurrent_bptt(x, R, b, output_final_state=True)
    (g1,) = torch.autograd.grad(out.sum() + fin[1].sum(), x, retain_graph=True)
    with torch.no_grad():
        fin[1].mul_(0)
    (g2,) = torch.autograd.grad(out.sum(), x)
    (g3,) = torch.autograd.grad(slstm_recurrent(x, R, b)[0].sum(), x)
    assert torch.isfinite(g1).all() and rel_err(g2, g3) < 1e-10


@pytest.mark.parametrize("block", [1, 3, 16])
def test_coefficient_blocks_join(block, monkeypatch):
    """The backward precomputes its coefficients in blocks of COEFFICIENT_BLOCK steps: any block size
    (here small ones, so that a short sequence crosses several) gives the same gradients."""
    monkeypatch.setattr(slstm_autograd, "COEFFICIENT_BLOCK", block)
    x, R, b, state = make_inputs(2, 17, 2, 4, with_state=True)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, :5] = False
    mask[1, 3::4] = False
    compare(x, R, b, state, mask)


@pytest.mark.slow
@pytest.mark.parametrize("T", [130, 300])
def test_long_sequences_cross_coefficient_blocks(T):
    """Long sequences (several blocks of COEFFICIENT_BLOCK steps), padding over a block boundary."""
    x, R, b, state = make_inputs(2, T, 2, 8, with_state=True)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, :129] = False
    mask[1, 100::7] = False
    compare(x, R, b, state, mask)


@pytest.mark.parametrize("padded", [False, True])
def test_operator_passes_opcheck(padded):
    """The custom operators pass torch.library.opcheck: schema, fake (meta) implementation, autograd
    registration and AOT dispatch with dynamic shapes, which is what torch.compile and torch.export rely on."""
    B, T, NH, DH = 2, 5, 2, 4
    x = torch.randn(B, T, NH, 4, DH, dtype=torch.float64, requires_grad=True)
    r = (0.3 * torch.randn(NH, DH, 4, DH, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(NH, 4, DH, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(NH, B, DH, dtype=torch.float64) for _ in range(4)]
    keep = None
    if padded:
        keep = torch.ones(1, T, B, 1, dtype=torch.bool)
        keep[0, :2, 0, 0] = False
    torch.library.opcheck(torch.ops.xlstm_hf.slstm_forward.default, (x, r, bias, *state, keep))


def test_compiled_training_step_equals_eager():
    """Under torch.compile the recurrence is one opaque operator (no graph break, no unrolled loop): a
    compiled forward + backward gives the eager outputs and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 2, 4, 3, requires_grad=True)
    r = (0.3 * torch.randn(2, 3, 4, 3)).requires_grad_()
    bias = torch.randn(2, 4, 3, requires_grad=True)

    def loss(x, r, bias):
        out, (h, c, n, m) = slstm_recurrent_bptt(x, r, bias, output_final_state=True)
        return out.square().sum() + c.sum()

    eager = torch.autograd.grad(loss(x, r, bias), (x, r, bias))
    compiled = torch.compile(loss, fullgraph=True)  # fullgraph: a graph break would raise
    got = torch.autograd.grad(compiled(x, r, bias), (x, r, bias))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_recurrent_kernel():
    """With R frozen (LoRA fine-tuning) the backward skips dR's matmul; the other gradients stay the
    reference's (float64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    r = 0.3 * torch.randn(2, 3, 4, 3, dtype=torch.float64)
    bias = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    out, _ = slstm_recurrent_bptt(x, r, bias)
    ref, _ = slstm_recurrent(x, r, bias)
    dy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, bias), dy), torch.autograd.grad(ref, (x, bias), dy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
