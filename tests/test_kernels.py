"""Fused Triton kernels against their PyTorch references (Triton's interpreter on CPU, fp32, small shapes),
the backend registry, and the whole model on the Triton backend against the PyTorch one.

Tolerances: fp32 with the same operation order up to matmul blocking; the recurrences are short (<= 12
steps) and values O(1), so differences stay at a few ulps of the largest value: 1e-5 relative to the
tensor's largest entry (measured: ~1e-7 outputs, <= 3e-7 gradients).
"""

import os

import warnings

import pytest
import torch
from conftest import randomise_, tiny_config

from xlstm_hf import backends, cells, xLSTMForCausalLM
from xlstm_hf.slstm_autograd import slstm_recurrent_bptt

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def slstm_inputs(B, T, NH, DH, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(B, T, NH, 4, DH, generator=g)
    R = 0.5 * torch.randn(NH, DH, 4, DH, generator=g)
    b = torch.randn(NH, 4, DH, generator=g)
    return [t.to(DEVICE).requires_grad_() for t in (x, R, b)]


@pytest.mark.parametrize("B, T, NH, DH", [(1, 5, 1, 4), (3, 7, 2, 5), (2, 4, 3, 16), (17, 3, 1, 8), (2, 3, 1, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_slstm_kernel_matches_reference(B, T, NH, DH, masked):
    from xlstm_hf.kernels.slstm import slstm_recurrent_triton

    x, R, b = slstm_inputs(B, T, NH, DH)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
        mask[0, : T // 2] = False  # left padding
    outs = [fn(x, R, b, output_final_state=True, mask=mask) for fn in (slstm_recurrent_triton, cells.slstm_recurrent)]
    for got, ref in zip([outs[0][0], *outs[0][1]], [outs[1][0], *outs[1][1]]):
        if torch.isinf(ref).any():  # m of a row that saw only padding stays -inf in both
            assert torch.equal(torch.isinf(got), torch.isinf(ref))
            got, ref = got.nan_to_num(neginf=0.0), ref.nan_to_num(neginf=0.0)
        assert rel_err(got, ref) < TOL
    w = torch.randn_like(outs[1][0])
    grads = []
    for out, (h, c, n, _) in outs:  # a loss on the outputs and on the final state
        loss = (out * w).sum() + c.sum() + (n * 0.5).sum() + h.sum()
        grads.append(torch.autograd.grad(loss, (x, R, b)))
    for got, ref in zip(*grads):
        assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("masked", [False, True])
def test_slstm_operators_pass_opcheck_and_compile(masked):
    """The sLSTM kernels run inside registered operators (xlstm_hf::slstm_triton_forward / _backward, the
    backward registered as the forward's autograd, fake implementations): opcheck tests the
    registrations, and a loss compiled with fullgraph=True (a graph break would raise) gives the eager
    values and gradients."""
    from xlstm_hf.kernels.slstm import slstm_recurrent_triton

    x, R, b = slstm_inputs(2, 5, 2, 16, seed=3)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5], device=DEVICE) if masked else None
    g = torch.Generator().manual_seed(4)
    state = [torch.randn(2, 2, 16, generator=g).to(DEVICE) for _ in range(4)]
    torch.library.opcheck(torch.ops.xlstm_hf.slstm_triton_forward.default, (x, R, b, *state, mask, True))
    # without the saved gates (inference) the operator has no backward: opcheck it on inputs without grad
    torch.library.opcheck(torch.ops.xlstm_hf.slstm_triton_forward.default,
                          (x.detach(), R.detach(), b.detach(), *state, mask, False))
    with torch.no_grad():
        *_, states, gates = torch.ops.xlstm_hf.slstm_triton_forward(x, R, b, *state, mask, True)
    d_out = torch.randn(2, 5, 2, 16, generator=g).to(DEVICE)
    torch.library.opcheck(torch.ops.xlstm_hf.slstm_triton_backward.default,
                          (x.detach(), R.detach(), gates, states, mask, d_out, *state[:3]))

    def loss(x, R, b):
        out, (h, c, n, _) = slstm_recurrent_triton(x, R, b, output_final_state=True, mask=mask)
        return (out * d_out).sum() + h.sum() + c.square().sum() + n.sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        value = fn(x, R, b)
        results.append((value, torch.autograd.grad(value, (x, R, b))))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert rel_err(compiled, eager) < 1e-6
    for got, want in zip(compiled_grads, eager_grads):
        assert rel_err(got, want) < 1e-6


def test_slstm_kernel_state_passing_and_initial_state_gradients():
    from xlstm_hf.kernels.slstm import slstm_recurrent_triton

    x, R, b = slstm_inputs(2, 9, 2, 8)
    _, s = cells.slstm_recurrent(x[:, :4].detach(), R.detach(), b.detach(), output_final_state=True)
    s = [t.clone().requires_grad_() for t in s]
    results = []
    for fn in (slstm_recurrent_triton, cells.slstm_recurrent):
        out, final = fn(x[:, 4:], R, b, initial_state=s, output_final_state=True)
        loss = out.square().sum() + final[1].sum()
        results.append((out, torch.autograd.grad(loss, (x, R, b, *s))))
    assert rel_err(results[0][0], results[1][0]) < TOL
    for got, ref in zip(results[0][1], results[1][1]):
        assert rel_err(got, ref) < TOL
    # two calls with the carried state equal one call
    full, _ = slstm_recurrent_triton(x, R, b)
    first, state = slstm_recurrent_triton(x[:, :4], R, b, output_final_state=True)
    second, _ = slstm_recurrent_triton(x[:, 4:], R, b, initial_state=state)
    assert rel_err(torch.cat([first, second], 1), full) < TOL


@pytest.mark.parametrize("value", [30.0, -30.0])
def test_slstm_kernel_extreme_gates(value):
    from xlstm_hf.kernels.slstm import slstm_recurrent_triton

    x, R, b = slstm_inputs(2, 5, 1, 8)
    x = torch.full_like(x, value).requires_grad_()
    out, state = slstm_recurrent_triton(x, R, b, output_final_state=True)
    ref, _ = cells.slstm_recurrent(x, R, b, output_final_state=True)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in state)
    assert rel_err(out, ref) < TOL
    (grad,) = torch.autograd.grad(out.sum(), (x,))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("NH, DH, masked", [(1, 96, False), (2, 192, True), (1, 256, False), (1, 512, True)])
def test_slstm_kernel_large_heads_against_float64(NH, DH, masked):
    """Heads wider than MAX_RESIDENT_HEAD_DIM stream R in tiles (the paper's 125M model: 192; 1.3B and up:
    256, 512; 96: a partial last tile): outputs, final states and the gradients of x, R, the bias and the
    initial state against the float64 reference. R ~ N(0, 1/DH) keeps the pre-activations O(1), as in a
    trained model; fp32 sums of DH products then agree to ~1e-6 of the largest entry."""
    from xlstm_hf.kernels.slstm import MAX_RESIDENT_HEAD_DIM, slstm_recurrent_triton

    assert DH > MAX_RESIDENT_HEAD_DIM
    B, T = 2, 4
    g = torch.Generator().manual_seed(DH)
    x = torch.randn(B, T, NH, 4, DH, generator=g)
    R = torch.randn(NH, DH, 4, DH, generator=g) / DH**0.5
    b = torch.randn(NH, 4, DH, generator=g)
    s = [torch.randn(B, NH, DH, generator=g) for _ in range(3)] + [torch.randn(B, NH, DH, generator=g)]
    s[2] = s[2].abs() + 0.5  # n > 0, as any reachable state
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, :2] = False
        mask = mask.to(DEVICE)
    w = torch.randn(B, T, NH, DH, generator=g)
    results = []
    for dtype, fn in ((torch.float32, slstm_recurrent_triton), (torch.float64, cells.slstm_recurrent)):
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, R, b, *s)]
        out, (h, c, n, m) = fn(*leaves[:3], initial_state=leaves[3:], output_final_state=True, mask=mask)
        loss = (out * w.to(out)).sum() + h.sum() + c.sum() + (0.5 * n).sum()
        results.append([out, h, c, n, m, *torch.autograd.grad(loss, leaves)])
    for got, ref in zip(*results):
        assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("B, NH, DK, DV", [(1, 1, 8, 8), (2, 3, 16, 12), (1, 2, 128, 96), (1, 1, 256, 256),
                                        (1, 1, 384, 384), (1, 1, 256, 512)])  # (the shipped designs: paper 125M, xLSTM-7B)
def test_mlstm_step_kernel_matches_reference(B, NH, DK, DV):
    from xlstm_hf.kernels.mlstm_step import mlstm_step_triton

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, NH, DK, generator=g).to(DEVICE) for _ in range(2))
    v = torch.randn(B, NH, DV, generator=g).to(DEVICE)
    state = cells.mlstm_zero_state(B, NH, DK, DV, DEVICE)
    ref_state = cells.mlstm_zero_state(B, NH, DK, DV, DEVICE)  # both steps update their state in place
    with torch.no_grad():
        for step in range(3):  # from the empty state (m = -inf) on, then carried
            i, f = (3 * torch.randn(B, NH, generator=g).to(DEVICE) for _ in range(2))
            h_ref, ref_state = cells.mlstm_step(q + step, k - step, v, i, f, ref_state)
            C_before = state[0]
            h, state = mlstm_step_triton(q + step, k - step, v, i, f, state)
            assert state[0] is C_before  # updated in place
            assert rel_err(h, h_ref) < TOL
            for got, ref in zip(state, ref_state):
                assert rel_err(got, ref) < TOL


def test_mlstm_step_operator_passes_opcheck_and_compiles():
    """The decode kernel is the registered operator xlstm_hf::mlstm_step_triton (C mutated in place, a
    fake implementation): opcheck tests the registration, and a compiled step (fullgraph: no graph break)
    computes what the eager one does."""
    from xlstm_hf.kernels.mlstm_step import mlstm_step_triton

    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    v = torch.randn(2, 2, 12, generator=g).to(DEVICE)
    i, f = (torch.randn(2, 2, generator=g).to(DEVICE) for _ in range(2))
    C, n, m = torch.randn(2, 2, 16, 12, generator=g).to(DEVICE), torch.rand(2, 2, 16).to(DEVICE), torch.randn(2, 2).to(DEVICE)
    torch.library.opcheck(torch.ops.xlstm_hf.mlstm_step_triton.default, (q, k, v, i, f, C.clone(), n, m, 1e-6))
    step = lambda *a: mlstm_step_triton(*a[:5], a[5:])  # noqa: E731
    with torch.no_grad():
        h, (C1, n1, m1) = step(q, k, v, i, f, C.clone(), n, m)
        h_c, (C1_c, n1_c, m1_c) = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, i, f, C.clone(), n, m)
    for got, want in ((h_c, h), (C1_c, C1), (n1_c, n1), (m1_c, m1)):
        assert torch.equal(got, want)


def test_mlstm_step_kernel_defers_to_reference_under_autograd():
    from xlstm_hf.kernels.mlstm_step import mlstm_step_triton

    q, k, v = (torch.randn(1, 2, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    i, f = torch.randn(1, 2, device=DEVICE), torch.randn(1, 2, device=DEVICE)
    state = cells.mlstm_zero_state(1, 2, 8, 8, DEVICE)
    h, _ = mlstm_step_triton(q, k, v, i, f, state)
    h.sum().backward()
    assert q.grad is not None


def test_backend_registry(monkeypatch):
    cpu = torch.device("cpu")
    assert backends.resolve_backend("auto", cpu) == "torch"
    assert backends.get_ops("torch", cpu)["slstm"] is slstm_recurrent_bptt
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        backends.resolve_backend("cuda-magic", cpu)
    monkeypatch.setattr(backends, "_said", set())
    monkeypatch.setenv("XLSTM_KERNEL_BACKEND", "torch")
    with pytest.warns(UserWarning, match=r"XLSTM_KERNEL_BACKEND=torch overrides the config's setting \('triton'\)"):
        assert backends.resolve_backend("triton", cpu) == "torch"  # the environment wins, and says so
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... once
        assert backends.resolve_backend("triton", cpu) == "torch"
    monkeypatch.delenv("XLSTM_KERNEL_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.resolve_backend("triton", cpu)
    # without Triton: "triton" is an ImportError; "auto" on CUDA tensors falls back to PyTorch with a warning, once
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="needs the `triton` package"):
        backends.resolve_backend("triton", cpu)
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match="runs the PyTorch reference cells on CUDA"):
        assert backends.resolve_backend("auto", cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", cuda) == "torch"
        assert backends.resolve_backend("auto", cpu) == "torch"  # no warning for CPU tensors


def test_compile_env_override_says_so_once(monkeypatch):
    monkeypatch.setattr(backends, "_said", set())
    monkeypatch.setenv(backends.COMPILE_ENV_VAR, "0")
    with pytest.warns(UserWarning, match=r"XLSTM_COMPILE=0 overrides the config's setting \(True\)"):
        assert not backends.compile_enabled(True, torch.device("cpu"), 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not backends.compile_enabled(True, torch.device("cpu"), 1024)


def test_model_on_triton_backend_equals_torch(design):
    """A tiny model of each design (paper: mLSTM and sLSTM blocks; large: xLSTM-7B's blocks): logits, loss
    gradients and generated tokens agree between the backends."""
    pytest.importorskip("xlstm_hf.kernels.mlstm_chunkwise")
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "triton"):
        # weights randomised at scale 0.1: at the default 0.3 the tiny model amplifies fp32 rounding
        # (1e-7 relative weight changes move its logits by ~3e-4), which would swamp the comparison
        torch.manual_seed(0)
        # chunk_size 8: the kernel rounds it up
        layout = {"num_blocks": 3, "slstm_at": [1]} if design == "paper" else {"num_blocks": 2}
        config = tiny_config(design, kernel_backend=backend, **layout)
        model = randomise_(xLSTMForCausalLM(config), scale=0.1).eval().to(DEVICE)
        model.zero_grad()
        out = model(ids.to(DEVICE), labels=ids.to(DEVICE))
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        tokens = model.generate(ids[:, :6].to(DEVICE), max_new_tokens=4, do_sample=False)
        results[backend] = (out.logits.detach(), grads, tokens)
    assert rel_err(results["triton"][0], results["torch"][0]) < 1e-4
    # A gradient far smaller than the others (the input-gate biases': ~1e-3 of the largest) is a sum of
    # cancelling terms whose fp32 rounding scales with the terms, not the sum: errors are measured against
    # at least 1% of the largest gradient (both backends are ~1e-5 off float64 there).
    floor = 1e-2 * max(g.abs().max() for g in results["torch"][1])
    for got, ref in zip(results["triton"][1], results["torch"][1]):
        assert ((got - ref).abs().max() / torch.maximum(ref.abs().max(), floor)).item() < 1e-4
    assert torch.equal(results["triton"][2], results["torch"][2])


def test_model_on_triton_backend_compiles_without_graph_breaks(design):
    """torch.compile(fullgraph=True) traces a training loss of the whole model on the Triton backend (its
    kernels are registered operators; a graph break would raise), and the compiled loss and gradients are
    the eager ones: the same kernels run, the glue around them is traced (the q, k, v the kernels receive
    are strided views of the projections, which their fake implementations must describe)."""
    torch.manual_seed(0)
    layout = {"num_blocks": 3, "slstm_at": [1]} if design == "paper" else {"num_blocks": 2}
    model = randomise_(xLSTMForCausalLM(tiny_config(design, kernel_backend="triton", **layout)), scale=0.1).to(DEVICE)
    ids = torch.randint(1, 97, (2, 21), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def loss(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        value = fn(ids)
        results.append((value.detach(), torch.autograd.grad(value, list(model.parameters()))))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert rel_err(compiled, eager) < 1e-6
    for got, want in zip(compiled_grads, eager_grads):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("DH", [16, 192])
def test_slstm_kernel_half_precision_inputs(DH):
    """fp16 inputs (bf16 is wrong in the interpreter) take the tensor-core path: h_{t-1}, R and the gate
    gradients are rounded to fp16 for the products (fp32 accumulation, fp32 states and cell math). Against
    the float64 reference on the same fp16 inputs the error is that rounding's, 2^-11 ~ 5e-4 relative per
    operand: within 2e-3 of the largest entry (measured <= 4.3e-4) for outputs and gradients over 6 steps;
    and above 1e-5, which shows the products were not done in fp32 (those agree to ~1e-7)."""
    from xlstm_hf.kernels.slstm import slstm_recurrent_triton

    g = torch.Generator().manual_seed(DH)
    x = torch.randn(2, 6, 2, 4, DH, generator=g).half()
    R = (torch.randn(2, DH, 4, DH, generator=g) / DH**0.5).half()
    b = torch.randn(2, 4, DH, generator=g).half()
    w = torch.randn(2, 6, 2, DH, generator=g)
    results = []
    for dtype, fn in ((None, slstm_recurrent_triton), (torch.float64, cells.slstm_recurrent)):
        leaves = [(t if dtype is None else t.to(dtype)).to(DEVICE).requires_grad_() for t in (x, R, b)]
        out, _ = fn(*leaves)
        results.append([out, *torch.autograd.grad((out.double() * w.to(out.device, torch.float64)).sum(), leaves)])
    assert [t.dtype for t in results[0]] == [torch.float16] * 4
    errors = [rel_err(got, ref) for got, ref in zip(*results)]
    assert max(errors) < 2e-3 and min(errors) > 1e-5, errors


def test_gpu_launch_configurations_fit_every_shipped_head():
    """The GPU autotuning candidates after pruning (the interpreter runs the default only, so this is
    checked here): never empty, tiles that tl.dot accepts (>= 16) and no wider than the head needs; the
    sLSTM keeps R in registers exactly for heads up to MAX_RESIDENT_HEAD_DIM."""
    import triton

    from xlstm_hf.kernels import mlstm_chunkwise as mc
    from xlstm_hf.kernels import mlstm_step as ms
    from xlstm_hf.kernels import slstm

    for DH in (4, 16, 48, 64, 96, 192, 256, 512, 768):
        for B in (1, 16, 64):
            kept = slstm._prune(slstm._CONFIGS, {"DH": DH, "B": B})
            blocks = {c.kwargs["BLOCK_D"] for c in kept}
            assert kept and all(16 <= c.kwargs["BLOCK_B"] <= max(16, triton.next_power_of_2(B)) for c in kept)
            if DH <= slstm.MAX_RESIDENT_HEAD_DIM:
                assert blocks == {max(16, triton.next_power_of_2(DH))}
            else:
                assert blocks == {32, 64, 128}
    for DK, DV in ((16, 16), (20, 12), (384, 384), (256, 512), (96, 192)):
        for L in mc.CHUNK_SIZES:
            kept = mc._prune(mc._CONFIGS, {}, DK=DK, DV=DV, L=L)
            assert kept
            for c in kept:
                for block, d in ((c.kwargs["BLOCK_K"], DK), (c.kwargs["BLOCK_V"], DV)):
                    assert 16 <= block <= max(16, triton.next_power_of_2(d)) and (L <= 64 or block <= 64)
        assert ms._prune(ms._tuned.configs, {"DK": DK, "DV": DV})


def test_matmul_precision_policy():
    """bf16/fp16 inputs: tensor-core operands in that dtype; fp32: exact unless the user asks for TF32."""
    import triton.language as tl

    from xlstm_hf.kernels.common import dot_precision

    assert dot_precision(torch.bfloat16)["DOT_DTYPE"] == tl.bfloat16
    assert dot_precision(torch.float16)["DOT_DTYPE"] == tl.float16
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == {"DOT_DTYPE": tl.float32, "PRECISION": "tf32"}
    finally:
        torch.set_float32_matmul_precision(before)
