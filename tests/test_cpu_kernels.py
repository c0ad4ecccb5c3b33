"""The fused CPU decode kernels of `kernels/cpu.py` against the PyTorch code they replace: the mLSTM step's
in-place state update with its read-out (`xlstm_hf::mlstm_step_update` vs `cells.mlstm_step`'s own
update) and `xlstm_hf::matvec` (vs `F.linear`), in float64 (rounding only: 1e-12) and float32 (the
accumulation order differs: 1e-5 relative to the largest entry), at odd sizes that exercise every tail
of the vectorised loops; both pass `torch.library.opcheck`. (The sLSTM step kernels are tested in
test_slstm_autograd.py.)"""

import pytest
import torch
import torch.nn.functional as F

from xlstm_hf import backends
from xlstm_hf.cells import mlstm_step, mlstm_zero_state
from xlstm_hf.kernels import cpu


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def test_kernels_build_here():
    """CI has a C compiler: the kernels must build (a silent fallback would leave them untested)."""
    assert cpu.library() is not None and cpu.built()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("O,I", [(7, 5), (50, 37), (96, 64), (1001, 130)])
def test_matvec_equals_linear(rows, O, I, dtype):
    g = torch.Generator().manual_seed(rows + O)
    x, w, b = (torch.randn(*s, generator=g, dtype=dtype) for s in ((rows, I), (O, I), (O,)))
    for bias in (None, b):
        got = torch.ops.xlstm_hf.matvec(x, w, bias)
        assert got.shape == (rows, O) and got.dtype == dtype
        assert rel(got, F.linear(x, w, bias)) < TOL[dtype]
    # leading dimensions as F.linear takes them: (B, 1, I)
    assert rel(torch.ops.xlstm_hf.matvec(x[:, None], w, b), F.linear(x[:, None], w, b)) < TOL[dtype]


def test_matvec_rejects_too_many_rows():
    with pytest.raises(ValueError, match="at most 8 rows"):
        torch.ops.xlstm_hf.matvec(torch.randn(9, 4), torch.randn(3, 4), None)


def test_linear_takes_the_kernel_only_without_gradients(monkeypatch):
    """`backends.linear` routes 3-8 rows to the kernel, never a tensor that needs a gradient."""
    calls = []
    monkeypatch.setattr(torch.ops.xlstm_hf, "matvec", lambda *a: calls.append(a) or F.linear(*a), raising=False)
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(4, 4)
    backends.linear(x, w).sum().backward()  # needs dW: F.linear
    assert not calls and w.grad is not None
    with torch.no_grad():
        backends.linear(x, w)
        backends.linear(x[:2], w)  # two rows: MKL's GEMM is as fast
    assert len(calls) == 1


def reference_update(C, q, gain_k, v, decay):
    numerator = decay[..., None] * (q[..., None, :] @ C).squeeze(-2) + (q * gain_k).sum(-1, keepdim=True) * v
    return numerator, decay[..., None, None] * C + gain_k[..., :, None] * v[..., None, :]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,NH,DK,DV", [(1, 1, 3, 5), (2, 3, 16, 24), (3, 2, 37, 19)])
def test_mlstm_step_update_equals_reference(B, NH, DK, DV, dtype):
    g = torch.Generator().manual_seed(DK)
    C = torch.randn(B, NH, DK, DV, generator=g, dtype=dtype)
    q, gain_k = (torch.randn(B, NH, DK, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, NH, DV, generator=g, dtype=dtype)
    decay = torch.rand(B, NH, generator=g, dtype=dtype)
    want_num, want_C = reference_update(C, q, gain_k, v, decay)
    num = torch.ops.xlstm_hf.mlstm_step_update(C, q, gain_k, v, decay)  # C updated in place
    assert rel(num, want_num) < TOL[dtype] and rel(C, want_C) < TOL[dtype]


@pytest.mark.parametrize("padded_state", [False, True])
def test_decode_step_with_kernel_equals_reference(padded_state):
    """cells.mlstm_step with the fused update (backends.mlstm_step_cpu) equals it without, over several
    steps from an empty state (m = -inf) or a carried one, in float64."""
    torch.manual_seed(0)
    B, NH, DK, DV = 2, 3, 8, 12
    state = mlstm_zero_state(B, NH, DK, DV, dtype=torch.float64)
    if padded_state:
        state = (torch.randn(B, NH, DK, DV, dtype=torch.float64), torch.randn(B, NH, DK, dtype=torch.float64),
                 torch.randn(B, NH, dtype=torch.float64))
    ours, ref = tuple(s.clone() for s in state), tuple(s.clone() for s in state)
    for _ in range(4):
        q, k = torch.randn(2, B, NH, DK, dtype=torch.float64)
        v = torch.randn(B, NH, DV, dtype=torch.float64)
        i, f = torch.randn(2, B, NH, dtype=torch.float64)
        h, ours = backends.mlstm_step_cpu(q, k, v, i, f, ours)
        h_ref, ref = mlstm_step(q, k, v, i, f, ref)
        assert rel(h, h_ref) < 1e-12
        for a, b in zip(ours, ref):
            assert rel(a, b) < 1e-12


def test_operators_pass_opcheck():
    C = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    args = (C, torch.randn(2, 2, 4, dtype=torch.float64), torch.randn(2, 2, 4, dtype=torch.float64),
            torch.randn(2, 2, 5, dtype=torch.float64), torch.rand(2, 2, dtype=torch.float64))
    torch.library.opcheck(torch.ops.xlstm_hf.mlstm_step_update.default, args)
    x, w, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    torch.library.opcheck(torch.ops.xlstm_hf.matvec.default, (x, w, b))
    torch.library.opcheck(torch.ops.xlstm_hf.matvec.default, (x, w, None))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [2, 3, 9])
@pytest.mark.parametrize("with_window", [False, True])
def test_causal_conv_kernel_equals_module(T, K, with_window, dtype):
    """CausalConv1d without gradients (the fused kernel, on a strided half of a wider input as in the mLSTM
    block) gives the PyTorch path's outputs and carried window, also for sequences shorter than the window."""
    from xlstm_hf.modeling_xlstm import CausalConv1d

    torch.manual_seed(T * 10 + K)
    conv = CausalConv1d(20, K).to(dtype)
    wide = torch.randn(2, T, 40, dtype=dtype)
    x = wide[..., :20]  # strided in time
    window = torch.randn(2, K - 1, 20, dtype=dtype) if with_window else None
    with torch.no_grad():
        y, new_window = conv(x, window)
    want, want_window = conv(x, window)  # with autograd on (the parameters need gradients): PyTorch's path
    assert torch.equal(new_window, want_window)
    assert rel(y, want) < TOL[dtype]
