"""The Triton chunkwise mLSTM (`xlstm_hf.kernels.mlstm_chunkwise`) against the PyTorch reference.

Runs in Triton's interpreter on CPU (TRITON_INTERPRET=1, set here unless the caller chose otherwise), in
fp32, with small shapes. Compared: outputs, final states (C, n, m), and the gradients of q, k, v, i, f and
of the initial state (C, n, m) for a loss that uses the outputs and the final C and n.

Tolerances. The kernel runs in fp32; the reference is run in float64 on the same (fp32-representable)
inputs, so the error measured is the kernel's own. Errors are relative to the largest entry of the
reference tensor. For O(1) inputs and sums over <= T*D terms fp32 rounding gives ~1e-6. Measured over
these cases with seeds 0-5 (DK = 256: seed 0): outputs and states <= 2.3e-6, gradients <= 4.7e-6, the
level of the fp32 *reference* against float64 (<= 4.1e-6); the largest relative values come from small
gradients that are differences of O(1) terms (e.g. df at T = 1). TOL = 1e-5. With extreme gates (+-30)
the exponents reach +-60, which costs the fp32 reference up to 7.6e-5; the kernel, which sums log-gate
differences directly, measured <= 1.8e-5: TOL_EXTREME = 1e-4.
dm0 = <dC0, C0> + <dn0, n0> is a difference of nearly equal terms (h does not change when C and n are
scaled together), so its error is measured relative to the size of those terms, not to its own value.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from xlstm_hf.cells import mlstm_chunkwise, mlstm_recurrent  # noqa: E402
from xlstm_hf.kernels.mlstm_chunkwise import mlstm_chunkwise_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5
TOL_EXTREME = 1e-4
NAMES = ("h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0")


def make_inputs(B, NH, T, DK, DV, extreme=False, seed=0):
    """float64 inputs that are exact in fp32: (q, k, v, i, f), an initial state, and loss weights."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).double()  # drawn in fp32: exact in both dtypes

    q, k, v = rand(B, NH, T, DK), rand(B, NH, T, DK), rand(B, NH, T, DV)
    i, f = rand(B, NH, T), rand(B, NH, T) + 2.0  # forget gates mostly open, as after the usual init
    if extreme:  # a third each of -30, +30 and ordinary values, in both gates
        for gate in (i, f):
            u = torch.rand(gate.shape, generator=g).double()
            gate.copy_(torch.where(u < 1 / 3, -30.0, torch.where(u < 2 / 3, 30.0, gate)))
    state = (rand(B, NH, DK, DV), rand(B, NH, DK).abs(), rand(B, NH))
    weights = (rand(B, NH, T, DV), rand(B, NH, DK, DV), rand(B, NH, DK))
    return (q, k, v, i, f), state, weights


def run(fn, inputs, state, weights, dtype, **kwargs):
    """Outputs, final state and gradients (w.r.t. the inputs and the initial state) of `fn`, in float64."""
    xs = [x.to(DEVICE, dtype).requires_grad_() for x in inputs]
    s0 = [s.to(DEVICE, dtype).requires_grad_() for s in state] if state is not None else None
    h, (C, n, m) = fn(*xs, initial_state=s0, output_final_state=True, **kwargs)
    w_h, w_C, w_n = (w.to(DEVICE) for w in weights)
    loss = (h.double() * w_h).sum() + (C.double() * w_C).sum() + (n.double() * w_n).sum()
    leaves = xs + (s0 or [])
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach().double().cpu() for t in (h, C, n, m, *grads)]


def rel_err(got, ref):
    if torch.isinf(ref).any():  # m = -inf (nothing seen) must be -inf in both
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        got, ref = got.nan_to_num(neginf=0.0), ref.nan_to_num(neginf=0.0)
    assert torch.isfinite(got).all()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_matches(got, ref, tol, state=None):
    """Compare the lists from `run`; with an initial state, dm0 relative to |<dC0, C0>| + |<dn0, n0>|."""
    errors = {}
    for name, a, b in zip(NAMES, got, ref):
        if name == "dm0":
            C0, n0 = (s.double() for s in state[:2])
            scale = ((ref[9] * C0).abs().sum((-2, -1)) + (ref[10] * n0).abs().sum(-1)).max()
            errors[name] = ((a - b).abs().max() / scale).item()
        else:
            errors[name] = rel_err(a, b)
    assert max(errors.values()) < tol, errors
    return errors


CASES = {
    # name: (B, NH, T, DK, DV, chunk_size, with initial state)
    "T=1": (1, 1, 1, 16, 16, 16, True),
    "shorter than a chunk, DK != DV, no initial state": (2, 2, 13, 16, 24, 16, False),
    "ragged T, DK not a power of two, DV < 16": (2, 3, 37, 20, 12, 16, True),
    "chunk 32": (1, 2, 70, 16, 32, 32, True),
    "chunk 64 (default), no initial state": (1, 1, 130, 16, 16, 64, False),
    "chunk 128": (1, 1, 140, 16, 16, 128, True),
    "DK = DV = 256 (4 x 4 tiles)": (1, 1, 20, 256, 256, 16, True),
    # the head dims of the shipped designs: the paper's 125M model (4 heads of 384), xLSTM-7B (DK 256,
    # DV 512) and the large design at 125M scale (DK 96, DV 192)
    "paper 125M: DK = DV = 384": (1, 1, 20, 384, 384, 16, True),
    "xLSTM-7B: DK 256, DV 512": (1, 1, 20, 256, 512, 16, True),
    "large at 125M: DK 96, DV 192": (1, 2, 20, 96, 192, 16, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case):
    B, NH, T, DK, DV, chunk_size, with_state = CASES[case]
    inputs, state, weights = make_inputs(B, NH, T, DK, DV)
    state = state if with_state else None
    ref = run(mlstm_chunkwise, inputs, state, weights, torch.float64, chunk_size=chunk_size)
    got = run(mlstm_chunkwise_triton, inputs, state, weights, torch.float32, chunk_size=chunk_size)
    assert_matches(got, ref, TOL, state)


def test_extreme_gates_stay_finite_and_match():
    inputs, state, weights = make_inputs(2, 1, 40, 16, 16, extreme=True, seed=1)
    ref = run(mlstm_chunkwise, inputs, state, weights, torch.float64, chunk_size=16)
    got = run(mlstm_chunkwise_triton, inputs, state, weights, torch.float32, chunk_size=16)
    assert_matches(got, ref, TOL_EXTREME, state)  # also checks that everything is finite


def test_matches_recurrent_form():
    # the step-by-step form has other stabilisers inside the sequence, but the same function and the
    # same final m (the chunk-end stabiliser is the running max of the recurrent one)
    inputs, state, weights = make_inputs(1, 2, 23, 16, 16, seed=2)
    ref = run(mlstm_recurrent, inputs, state, weights, torch.float64)
    got = run(mlstm_chunkwise_triton, inputs, state, weights, torch.float32, chunk_size=16)
    assert_matches(got, ref, TOL, state)


def test_state_passing_equals_one_call():
    inputs, _, _ = make_inputs(2, 2, 40, 16, 16, seed=3)
    xs = [x.float().to(DEVICE).requires_grad_() for x in inputs]
    h_full, state_full = mlstm_chunkwise_triton(*xs, output_final_state=True, chunk_size=16)
    cut = 23  # not on a chunk boundary: the two calls use other chunks and stabilisers than the one call
    first = [x[:, :, :cut] for x in xs]
    second = [x[:, :, cut:] for x in xs]
    h1, state1 = mlstm_chunkwise_triton(*first, output_final_state=True, chunk_size=16)
    h2, state2 = mlstm_chunkwise_triton(*second, initial_state=state1, output_final_state=True, chunk_size=16)
    h_split = torch.cat([h1, h2], dim=2)
    assert rel_err(h_split.double(), h_full.double()) < TOL
    for a, b in zip(state2, state_full):
        assert rel_err(a.double(), b.double()) < TOL
    # gradients flow back through the carried state as through the single call
    w = torch.randn_like(h_full)
    losses = [(h * w).sum() + s[0].sum() + s[1].sum() for h, s in ((h_full, state_full), (h_split, state2))]
    for g_full, g_split in zip(*(torch.autograd.grad(loss, xs) for loss in losses)):
        assert rel_err(g_split.double(), g_full.double()) < TOL


def test_loss_on_outputs_only():
    # no initial state and no final state returned: the final-state gradients reach the kernel as None
    inputs, _, _ = make_inputs(1, 2, 19, 16, 16, seed=4)
    grads = []
    for fn, dtype in ((mlstm_chunkwise, torch.float64), (mlstm_chunkwise_triton, torch.float32)):
        xs = [x.to(DEVICE, dtype).requires_grad_() for x in inputs]
        h, state = fn(*xs, chunk_size=16)
        assert state is None
        grads.append(torch.autograd.grad(h.double().pow(2).sum(), xs))
    for got, ref in zip(*grads):
        assert rel_err(got.double().cpu(), ref.cpu()) < TOL


@pytest.mark.parametrize("DK, DV", [(16, 16), (128, 192)])
def test_half_precision_inputs_take_tensor_core_products(DK, DV):
    """fp16 inputs (bf16 is wrong in the interpreter) take the tensor-core path: the products' operands
    (q, k, v, the scores, the state tiles, the gradients' factors) are rounded to fp16, accumulation and
    states stay fp32, outputs and gradients come back in fp16. Against float64 on the same fp16 inputs the
    error is that rounding's, 2^-11 ~ 5e-4 relative per operand: within 4e-3 of the largest entry; and above
    1e-5 for what comes out of products, which shows they were not done in fp32 (those agree to ~1e-6,
    see TOL)."""
    inputs, state, weights = make_inputs(1, 2, 40, DK, DV, seed=5)
    inputs = [x.half().double() for x in inputs]  # exact in fp16
    state = [s.float().double() for s in state]
    got = run(mlstm_chunkwise_triton, [x.half() for x in inputs], state, weights, torch.float16, chunk_size=16)
    ref = run(mlstm_chunkwise, inputs, state, weights, torch.float64, chunk_size=16)
    errors = {name: rel_err(a, b) for name, a, b in zip(NAMES, got, ref) if name != "dm0"}
    assert max(errors.values()) < 4e-3, errors
    assert min(errors[name] for name in ("h", "C", "dq", "dk", "dv")) > 1e-5, errors  # (n, m: no products)


@pytest.mark.parametrize("bad", ["chunk_size", "dtype", "shape", "state"])
def test_rejects_unsupported_arguments(bad):
    inputs, state, _ = make_inputs(1, 1, 8, 16, 16)
    xs = [x.float().to(DEVICE) for x in inputs]
    kwargs = {}
    if bad == "chunk_size":
        kwargs["chunk_size"] = 0  # (other sizes are rounded to a supported one)
    elif bad == "dtype":
        xs = [x.double() for x in xs]
    elif bad == "shape":
        xs[2] = xs[2][:, :, :5]  # v shorter than q
    else:
        kwargs["initial_state"] = (state[0][..., :8].float(), state[1].float(), state[2].float())
    with pytest.raises(ValueError):
        mlstm_chunkwise_triton(*xs, **kwargs)


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_packed_documents_match_the_reference(chunk_size):
    """resets (packed documents): documents start inside chunks, exactly at a chunk boundary (32), at the first
    token of row 1 (dropping its initial state) and as one-token documents; outputs, final states and every
    gradient against the float64 reference with the same resets."""
    T = 45
    inputs, state, weights = make_inputs(2, 2, T, 16, 24, seed=8)
    resets = torch.zeros(2, T, dtype=torch.bool)
    resets[0, [3, 4, 19, 32, 40]] = True
    resets[1, [0, 16, 17, 44]] = True
    ref = run(mlstm_chunkwise, inputs, state, weights, torch.float64, chunk_size=chunk_size, resets=resets)
    got = run(mlstm_chunkwise_triton, inputs, state, weights, torch.float32, chunk_size=chunk_size,
              resets=resets.to(DEVICE))
    assert_matches(got, ref, TOL, state)
    plain = run(mlstm_chunkwise_triton, inputs, state, weights, torch.float32, chunk_size=chunk_size)
    assert rel_err(plain[0], ref[0]) > 1e-3  # the resets matter


def test_operators_pass_opcheck():
    """The kernels run inside registered operators (forward and backward, the backward registered as the
    forward's autograd): opcheck tests their schemas, fake (meta) implementations and autograd
    registration against the real kernels, with and without a carried state."""
    inputs, state, _ = make_inputs(1, 2, 21, 16, 16, seed=6)
    xs = [x.float().to(DEVICE).requires_grad_() for x in inputs]
    s0 = [s.float().to(DEVICE) for s in state]
    forward = torch.ops.xlstm_hf.mlstm_chunkwise_triton_forward.default
    torch.library.opcheck(forward, (*xs, *s0, 1e-6, 16))
    m0 = torch.full_like(s0[2], float("-inf"))  # the empty state
    torch.library.opcheck(forward, (*xs, torch.zeros_like(s0[0]), torch.zeros_like(s0[1]), m0, 1e-6, 16))
    with torch.no_grad():
        h, C, n, _, *saved = forward(*xs, *s0, 1e-6, 16)
    backward = torch.ops.xlstm_hf.mlstm_chunkwise_triton_backward.default
    torch.library.opcheck(backward, (*[x.detach() for x in xs], *saved[:3], h, *saved[3:], torch.randn_like(h),
                                     torch.randn_like(C), torch.randn_like(n), 1e-6, 16))


def test_compiled_without_graph_breaks_equals_eager():
    """torch.compile(fullgraph=True) traces a loss through the kernel's operators (a graph break would
    raise), and the compiled outputs and gradients are the eager ones (the same kernels run)."""
    inputs, state, weights = make_inputs(1, 2, 37, 16, 16, seed=7)
    w_h = weights[0].float().to(DEVICE)

    def loss(q, k, v, i, f, C0, n0, m0):
        h, (C, n, _) = mlstm_chunkwise_triton(q, k, v, i, f, initial_state=(C0, n0, m0), output_final_state=True,
                                              chunk_size=16)
        return (h * w_h).sum() + C.square().sum() + n.sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        xs = [x.float().to(DEVICE).requires_grad_() for x in (*inputs, *state)]
        value = fn(*xs)
        results.append((value, torch.autograd.grad(value, xs)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert rel_err(compiled, eager) < 1e-6
    for got, want in zip(compiled_grads, eager_grads):
        assert rel_err(got, want) < 1e-6
