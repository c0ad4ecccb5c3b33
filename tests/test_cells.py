"""The cell recurrences: the three mLSTM forms agree with each other and with an unstabilised float64
oracle written here from the paper's equations; the sLSTM agrees with its own unstabilised oracle.

Tolerances: in float64 the forms differ only by rounding (relative 1e-10 is ample); float32 comparisons
use 1e-4 relative to the output scale (sums over ~T*D terms of O(1) values).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from xlstm_hf.cells import MLSTM_FORMS, mlstm_chunkwise, mlstm_recurrent, mlstm_step, slstm_recurrent


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def mlstm_inputs(B=2, NH=3, T=37, DK=8, DV=6, gate_scale=3.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(B, NH, T, DK), r(B, NH, T, DK), r(B, NH, T, DV), gate_scale * r(B, NH, T), gate_scale * r(B, NH, T) + 2


def mlstm_oracle(q, k, v, i, f):
    """Paper eqs. without stabilisation (float64, eps = 0): C_t = f C + e^i k v^T, h = C^T q / max(|n.q|, 1)."""
    B, NH, T, DK = q.shape
    C = torch.zeros(B, NH, DK, v.shape[-1], dtype=q.dtype)
    n = torch.zeros(B, NH, DK, dtype=q.dtype)
    out = []
    for t in range(T):
        kt = k[..., t, :] / math.sqrt(DK)
        ig, fg = torch.exp(i[..., t]), torch.sigmoid(f[..., t])
        C = fg[..., None, None] * C + ig[..., None, None] * kt[..., :, None] * v[..., t, None, :]
        n = fg[..., None] * n + ig[..., None] * kt
        qt = q[..., t, :]
        out.append((qt[..., None, :] @ C).squeeze(-2) / torch.clamp((qt * n).sum(-1).abs(), min=1.0)[..., None])
    return torch.stack(out, -2)


@pytest.mark.parametrize("T", [1, 7, 8, 9, 16, 37])
@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_mlstm_forms_match_unstabilised_oracle(form, T):
    q, k, v, i, f = mlstm_inputs(T=T)
    h, _ = MLSTM_FORMS[form](q, k, v, i, f, eps=0.0, chunk_size=8)
    assert rel_err(h, mlstm_oracle(q, k, v, i, f)) < 1e-10


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
def test_mlstm_chunkwise_equals_recurrent_with_states(chunk_size):
    q, k, v, i, f = mlstm_inputs(T=29)
    hc, sc = mlstm_chunkwise(q, k, v, i, f, output_final_state=True, chunk_size=chunk_size)
    hr, sr = mlstm_recurrent(q, k, v, i, f, output_final_state=True)
    hp, _ = MLSTM_FORMS["parallel"](q, k, v, i, f)
    assert rel_err(hc, hr) < 1e-10 and rel_err(hp, hr) < 1e-10
    for a, b in zip(sc, sr):
        assert rel_err(a, b) < 1e-10


def test_mlstm_state_passing():
    """Two calls with the carried state equal one call (the basis of chunked prefill and decoding)."""
    q, k, v, i, f = mlstm_inputs(T=30)
    h, s = mlstm_chunkwise(q, k, v, i, f, output_final_state=True, chunk_size=8)
    cut = 13
    first = [t[..., :cut, :] if t.dim() == 4 else t[..., :cut] for t in (q, k, v, i, f)]
    second = [t[..., cut:, :] if t.dim() == 4 else t[..., cut:] for t in (q, k, v, i, f)]
    h1, s1 = mlstm_chunkwise(*first, output_final_state=True, chunk_size=8)
    h2, s2 = mlstm_chunkwise(*second, initial_state=s1, output_final_state=True, chunk_size=8)
    assert rel_err(torch.cat([h1, h2], -2), h) < 1e-10
    # without the final state (the loop then skips the last chunk's state update): the same outputs
    h2_alone, none = mlstm_chunkwise(*second, initial_state=s1, chunk_size=8)
    assert none is None and torch.equal(h2_alone, h2)
    # and one step from the carried state equals the next position of the sequence
    hs, _ = mlstm_step(*(t[..., cut, :] if t.dim() == 4 else t[..., cut] for t in (q, k, v, i, f)),
                       tuple(t.clone() for t in s1))  # (a step updates its state in place)
    assert rel_err(hs, h[..., cut, :]) < 1e-10
    for a, b in zip(s2, s):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("T", [5, 19])  # one chunk (no carried state, no final update) and three
@pytest.mark.parametrize("form", ["parallel", "chunkwise"])
def test_mlstm_gradients_match_recurrent(form, T):
    inputs = [t.requires_grad_() for t in mlstm_inputs(T=T)]
    grads = []
    for fn in (MLSTM_FORMS[form], mlstm_recurrent):
        h, _ = fn(*inputs, chunk_size=8)
        grads.append(torch.autograd.grad((h * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum(), inputs))
    for ga, gb in zip(*grads):
        assert rel_err(ga, gb) < 1e-9


@pytest.mark.parametrize("gate", [30.0, -30.0])
def test_mlstm_extreme_gates_stay_finite(gate):
    q, k, v, i, f = mlstm_inputs(T=20, dtype=torch.float32)
    i, f = torch.full_like(i, gate), torch.full_like(f, gate)
    outs = [MLSTM_FORMS[name](q, k, v, i, f, chunk_size=8)[0] for name in ("parallel", "chunkwise", "recurrent")]
    for h in outs:
        assert torch.isfinite(h).all()
    assert rel_err(outs[1], outs[2]) < 1e-4 and rel_err(outs[0], outs[2]) < 1e-4


def test_mlstm_long_input_chunkwise_equals_recurrent():
    """4k tokens: finite, and the chunkwise form still equals the step-by-step recurrence (float32)."""
    q, k, v, i, f = mlstm_inputs(B=1, NH=2, T=4100, DK=8, DV=8, gate_scale=1.0, dtype=torch.float32)
    hc, sc = mlstm_chunkwise(q, k, v, i, f, output_final_state=True, chunk_size=64)
    hr, sr = mlstm_recurrent(q, k, v, i, f, output_final_state=True)
    assert torch.isfinite(hc).all()
    assert rel_err(hc, hr) < 1e-4
    assert rel_err(sc[0], sr[0]) < 1e-4


def slstm_inputs(B=2, T=23, NH=3, DH=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(B, T, NH, 4, DH), 0.5 * r(NH, DH, 4, DH), r(NH, 4, DH)


def slstm_oracle(x, R, b):
    """sLSTM without stabilisation (float64): i = exp(i~), f = sigmoid(f~), h = o * c / n."""
    B, T, NH, _, DH = x.shape
    h = c = n = torch.zeros(B, NH, DH, dtype=x.dtype)
    out = []
    for t in range(T):
        raw = x[:, t] + torch.einsum("bhj,hjgd->bhgd", h, R) + b
        i, f, z, o = raw.unbind(2)
        c = torch.sigmoid(f) * c + torch.exp(i) * torch.tanh(z)
        n = torch.sigmoid(f) * n + torch.exp(i)
        h = torch.sigmoid(o) * c / n
        out.append(h)
    return torch.stack(out, 1)


def test_slstm_matches_unstabilised_oracle():
    x, R, b = slstm_inputs()
    h, _ = slstm_recurrent(x, R, b)
    assert rel_err(h, slstm_oracle(x, R, b)) < 1e-10


def test_slstm_state_passing_and_mask():
    x, R, b = slstm_inputs(T=20)
    h, s = slstm_recurrent(x, R, b, output_final_state=True)
    h1, s1 = slstm_recurrent(x[:, :9], R, b, output_final_state=True)
    h2, s2 = slstm_recurrent(x[:, 9:], R, b, initial_state=s1, output_final_state=True)
    assert rel_err(torch.cat([h1, h2], 1), h) < 1e-12
    # masked (padding) steps leave the state exactly as if they were absent
    pad = torch.randn(2, 4, *x.shape[2:], dtype=x.dtype)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[:, :4] = False
    hp, sp = slstm_recurrent(torch.cat([pad, x], 1), R, b, output_final_state=True, mask=mask)
    assert rel_err(hp[:, 4:], h) < 1e-12
    for a, c in zip(sp, s):
        assert rel_err(a, c) < 1e-12


def test_slstm_gradients_finite_and_match_oracle():
    x, R, b = (t.requires_grad_() for t in slstm_inputs(T=12))
    g1 = torch.autograd.grad(slstm_recurrent(x, R, b)[0].sum(), (x, R, b))
    g2 = torch.autograd.grad(slstm_oracle(x, R, b).sum(), (x, R, b))
    for a, c in zip(g1, g2):
        assert rel_err(a, c) < 1e-9


def test_slstm_extreme_gates_stay_finite():
    x, R, b = slstm_inputs(T=10, dtype=torch.float32)
    for value in (30.0, -30.0):
        h, s = slstm_recurrent(torch.full_like(x, value), R, b, output_final_state=True)
        assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in s)


def test_float32_inputs_match_float64():
    q, k, v, i, f = mlstm_inputs(T=21)
    h64, _ = mlstm_chunkwise(q, k, v, i, f, chunk_size=8)
    h32, _ = mlstm_chunkwise(*(t.float() for t in (q, k, v, i, f)), chunk_size=8)
    assert h32.dtype == torch.float32 and rel_err(h32.double(), h64) < 1e-4
    assert F.mse_loss(h32.double(), h64) < 1e-8


@pytest.mark.parametrize("T", [37, 300])
def test_cells_compute_in_float32_under_autocast(T):
    """Under torch.autocast (Trainer(bf16=True), `xlstm-hf train --bf16`) the cells still compute in float32:
    their outputs, states and gradients equal those without autocast exactly (autocast would run their
    matmuls in bf16: ~5e-3 relative at T=37, 2% at T=300)."""
    q, k, v, i, f = (t.float().requires_grad_() for t in mlstm_inputs(T=T, dtype=torch.float32, gate_scale=1.0))
    x, R, b = (t.float().requires_grad_() for t in slstm_inputs(T=T, dtype=torch.float32))
    calls = {
        "mlstm_chunkwise": lambda: mlstm_chunkwise(q, k, v, i, f, output_final_state=True, chunk_size=16),
        "mlstm_parallel": lambda: MLSTM_FORMS["parallel"](q, k, v, i, f),
        "mlstm_recurrent": lambda: mlstm_recurrent(q, k, v, i, f, output_final_state=True),
        "slstm_recurrent": lambda: slstm_recurrent(x, R, b, output_final_state=True),
    }
    for name, call in calls.items():
        plain = call()
        plain_grads = torch.autograd.grad(plain[0].square().sum(), (x, R, b) if name.startswith("s") else (q, k, v, i, f))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = call()
        # backward outside the autocast region, as recommended (and as Trainer does it)
        cast_grads = torch.autograd.grad(cast[0].square().sum(), (x, R, b) if name.startswith("s") else (q, k, v, i, f))
        assert cast[0].dtype == torch.float32
        torch.testing.assert_close(cast, plain, rtol=0, atol=0, msg=name)
        for got, want in zip(cast_grads, plain_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_hand_written_backwards_compute_in_float32_inside_autocast():
    """The hand-written backwards (sLSTM over time, recomputing chunkwise mLSTM) give the same gradients
    when backward() is called inside an autocast region as outside it."""
    from xlstm_hf.cells import mlstm_chunkwise_recompute
    from xlstm_hf.slstm_autograd import slstm_recurrent_bptt

    q, k, v, i, f = (t.float().requires_grad_() for t in mlstm_inputs(T=40, dtype=torch.float32, gate_scale=1.0))
    x, R, b = (t.float().requires_grad_() for t in slstm_inputs(T=23, dtype=torch.float32))
    for call, inputs in ((lambda: mlstm_chunkwise_recompute(q, k, v, i, f, chunk_size=16)[0], (q, k, v, i, f)),
                         (lambda: slstm_recurrent_bptt(x, R, b)[0], (x, R, b))):
        plain = torch.autograd.grad(call().square().sum(), inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = torch.autograd.grad(call().square().sum(), inputs)
        for got, want in zip(cast, plain):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
