"""The chunkwise mLSTM with a hand-written, recomputing backward (`cells.mlstm_chunkwise_recompute`) computes
the function and the gradients of the reference `cells.mlstm_chunkwise` (autograd through every chunk).

In float64 both run the same forward code (shared per-chunk helpers) and differ only in the order of the
backward's roundings, so 1e-10 relative to each tensor's largest entry is ample (we see ~1e-15). In float32
the yardstick is the reference's own float32 error against float64: the recomputing backward must be as
accurate as autograd through the reference (within 2x and a floor of a few float32 ulps).
"""

import functools

import pytest
import torch

from xlstm_hf.cells import MLSTMChunkwiseFunction, mlstm_chunkwise, mlstm_chunkwise_recompute

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and on a busy machine two threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_inputs(B=2, NH=2, T=37, DK=8, DV=6, gate_scale=3.0, state=False, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    inputs = [r(B, NH, T, DK), r(B, NH, T, DK), r(B, NH, T, DV), gate_scale * r(B, NH, T), gate_scale * r(B, NH, T) + 2]
    if state:  # a state as a previous call leaves it: n of the size of the k's it summed, m finite
        inputs += [r(B, NH, DK, DV), r(B, NH, DK), r(B, NH)]
    return inputs


def pad(inputs, where):
    """Padding at the positions `where` (a (T,) bool mask, or (B, T)): i~ = -inf, f~ = +inf."""
    q, k, v, i, f, *state = inputs
    where = where if where.dim() == 2 else where.expand(q.shape[0], -1)
    i = i.masked_fill(where[:, None, :], float("-inf"))
    f = f.masked_fill(where[:, None, :], float("inf"))
    return [q, k, v, i, f, *state]


def run(fn, inputs, chunk_size, final_state_loss=True, output_loss=True, seed=1):
    """Outputs, final state and the gradients of a loss of both w.r.t. every input."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    q, k, v, i, f, *state = leaves
    h, (C, n, m) = fn(q, k, v, i, f, initial_state=tuple(state) or None, output_final_state=True,
                      chunk_size=chunk_size)
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    if output_loss:
        loss = loss + (h.double() * torch.randn(h.shape, generator=g, dtype=F64)).sum()
    if final_state_loss:
        loss = loss + (C.double() * torch.randn(C.shape, generator=g, dtype=F64)).sum() + \
            (n.double() * torch.randn(n.shape, generator=g, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)  # q: unused without h
    return [h, C, n, m, *grads]


def assert_same(got, want, tol=1e-10, gate_scale=False):
    """Equal to `tol` relative to each tensor's largest entry. With `gate_scale`, df relative to the larger
    of di and df: d log f_j sums terms of the size of di that cancel where the forget gates are closed
    (f~ = -30: df ~ 1e-11 from terms ~ 4), and both backwards round those terms differently."""
    names = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"]
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all() == torch.isfinite(b).all(), name
        scale = b.abs().max()
        if name == "df" and gate_scale:
            scale = torch.maximum(scale, want[7].abs().max())
        assert (a - b).abs().max() <= tol * scale, (name, rel_err(a, b))


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 5, 64, 100, 200])
@pytest.mark.parametrize("state", [False, True])
def test_equals_reference_float64(T, chunk_size, state):
    inputs = make_inputs(T=T, state=state, seed=T)
    for losses in ((True, True), (False, True)):  # with and without a loss on the final state
        assert_same(run(mlstm_chunkwise_recompute, inputs, chunk_size, *losses),
                    run(mlstm_chunkwise, inputs, chunk_size, *losses))


@pytest.mark.parametrize("state_every", [2, 3, None, 100])
@pytest.mark.parametrize("T", [5, 100, 200])
def test_states_of_every_kth_chunk(T, state_every):
    """Keeping only every K-th chunk's state (the backward recomputes the others): the same gradients."""
    inputs = pad(make_inputs(T=T, state=True, seed=T), torch.arange(T) % 7 == 3)
    fn = functools.partial(mlstm_chunkwise_recompute, state_every=state_every)
    assert_same(run(fn, inputs, 16), run(mlstm_chunkwise, inputs, 16))


def test_state_every_must_be_positive():
    inputs = make_inputs(T=9)
    for bad in (0, 1.5, "2", True):
        with pytest.raises(ValueError, match="state_every"):
            mlstm_chunkwise_recompute(*inputs, state_every=bad)


def test_gradient_from_the_final_state_alone():
    inputs = make_inputs(T=45, state=True)
    assert_same(run(mlstm_chunkwise_recompute, inputs, 16, output_loss=False),
                run(mlstm_chunkwise, inputs, 16, output_loss=False))


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("layout", ["left", "right", "scattered", "whole_chunk"])
def test_padding(layout, state):
    """Padded positions (i~ = -inf, f~ = +inf): finite gradients, the reference's."""
    T, L = 40, 16
    where = torch.zeros(2, T, dtype=torch.bool)
    if layout == "left":
        where[0, :7], where[1, :20] = True, True  # the second row pads past the first chunk
    elif layout == "right":
        where[0, -5:], where[1, -19:] = True, True
    elif layout == "scattered":
        where[:, ::3] = True
    else:
        where[:, 16:32] = True
    inputs = pad(make_inputs(T=T, state=state), where)
    got, want = run(mlstm_chunkwise_recompute, inputs, L), run(mlstm_chunkwise, inputs, L)
    for t in got[:3] + got[4:]:
        assert torch.isfinite(t).all()
    assert_same(got, want)


@pytest.mark.parametrize("gates", [(30.0, 30.0), (-30.0, -30.0), (30.0, -30.0), (-30.0, 30.0), "wide"])
def test_extreme_gates(gates):
    inputs = make_inputs(T=50, state=True, seed=3)
    if gates == "wide":  # gate pre-activations spread over +-40
        inputs[3], inputs[4] = inputs[3] * 13, inputs[4] * 13
    else:
        inputs[3], inputs[4] = torch.full_like(inputs[3], gates[0]), torch.full_like(inputs[4], gates[1])
    got, want = run(mlstm_chunkwise_recompute, inputs, 16), run(mlstm_chunkwise, inputs, 16)
    assert all(torch.isfinite(t).all() for t in got)
    assert_same(got, want, gate_scale=True)
    # and in float32 too: finite
    got32 = run(mlstm_chunkwise_recompute, [t.float() for t in inputs], 16)
    assert all(torch.isfinite(t).all() for t in got32)


@pytest.mark.parametrize("state", [False, True])
def test_float32_as_accurate_as_reference(state):
    """Float32 against float64: the recomputing backward's error is that of autograd through the reference."""
    inputs = make_inputs(B=2, NH=2, T=150, DK=16, DV=16, gate_scale=1.5, state=state)
    exact = run(mlstm_chunkwise, inputs, 64)
    inputs32 = [t.float() for t in inputs]
    got, ref = run(mlstm_chunkwise_recompute, inputs32, 64), run(mlstm_chunkwise, inputs32, 64)
    for a, r, x in zip(got, ref, exact):
        assert a.dtype == torch.float32
        err, ref_err = rel_err(a.double(), x), rel_err(r.double(), x)
        assert err <= 2 * ref_err + 1e-6, (err, ref_err)
        assert err < 1e-4  # the tolerance test_cells uses for float32 (sums of ~T*D O(1) terms)


def test_gradcheck():
    """Numerical gradients on a tiny float64 case, 3 chunks (the last partial). With eps = 0 the outputs and
    the unstabilised final state exp(m) C, exp(m) n do not depend on the stabilisers, so the gradients
    with stabilisers held constant are the true ones."""
    inputs = [t.requires_grad_() for t in make_inputs(B=1, NH=2, T=7, DK=3, DV=2, gate_scale=1.0, state=True, seed=5)]
    inputs[6] = inputs[6].detach().abs().requires_grad_()  # n0 of k's sign pattern keeps |den| off the floor

    def fn(q, k, v, i, f, C0, n0, m0):
        h, (C, n, m) = mlstm_chunkwise_recompute(q, k, v, i, f, (C0, n0, m0), output_final_state=True, eps=0.0,
                                                 chunk_size=3)
        return h, C * m.exp()[..., None, None], n * m.exp()[..., None]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_dtypes_no_grad_and_autocast():
    """bfloat16 inputs: output in bfloat16, states float32, gradients of the inputs' dtypes; without autograd
    the reference's loop runs (no states kept); under autocast the computation stays float32."""
    inputs = make_inputs(T=30, state=True, dtype=torch.float32)
    bf16 = [t.bfloat16() for t in inputs[:5]] + inputs[5:]
    got, want = run(mlstm_chunkwise_recompute, bf16, 16), run(mlstm_chunkwise, bf16, 16)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # float32 differences, rounded to bfloat16
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    with torch.no_grad():
        h, s = mlstm_chunkwise_recompute(*inputs[:5], initial_state=tuple(inputs[5:]), output_final_state=True)
        h_ref, s_ref = mlstm_chunkwise(*inputs[:5], initial_state=tuple(inputs[5:]), output_final_state=True)
    torch.testing.assert_close((h, s), (h_ref, s_ref), rtol=0, atol=0)
    plain = run(mlstm_chunkwise_recompute, inputs, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run(mlstm_chunkwise_recompute, inputs, 16)  # the backward too, inside the autocast region
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)


def saved_bytes(fn, inputs, chunk_size):
    """Bytes autograd keeps for the backward of `fn` (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves, chunk_size=chunk_size)
    return sum(storages.values())


def test_saves_inputs_and_boundary_states_only():
    B, NH, T, DK, DV, L = 2, 2, 256, 16, 16, 32
    inputs = make_inputs(B=B, NH=NH, T=T, DK=DK, DV=DV, dtype=torch.float32)
    elem = 4
    # q, k (scaled), v, h; i, log f and f (logsigmoid's backward); a state per chunk: C, n, m
    bound = elem * (B * NH * T * (2 * DK + 2 * DV + 3) + (T // L) * B * NH * (DK * DV + DK + 1))
    ours = saved_bytes(mlstm_chunkwise_recompute, inputs, L)
    assert ours <= bound * 1.05 + 4096
    assert ours * 3 < saved_bytes(mlstm_chunkwise, inputs, L)
    # the states of every 4th chunk only (8 chunks: 2 states)
    state_bytes = elem * B * NH * (DK * DV + DK + 1)
    fewer = saved_bytes(functools.partial(mlstm_chunkwise_recompute, state_every=4), inputs, L)
    assert fewer == ours - (T // L - 2) * state_bytes


def test_function_rejects_nothing_it_needs():
    """The Function on prepared inputs returns a constant m (no gradient) and the state as outputs."""
    q, k, v, i, f = (t.requires_grad_() for t in make_inputs(T=9))
    C0, n0 = torch.zeros(2, 2, 8, 6, dtype=F64), torch.zeros(2, 2, 8, dtype=F64)
    m0 = torch.full((2, 2), -torch.inf, dtype=F64)
    h, C, n, m = MLSTMChunkwiseFunction.apply(q, k, v, i, torch.nn.functional.logsigmoid(f), C0, n0, m0, 1e-6, 4, 1)
    assert h.requires_grad and C.requires_grad and n.requires_grad and not m.requires_grad


def test_normaliser_tie():
    """|den| = exp(-stab) exactly (q . k = 1, i~ = 0 at the first token): torch.maximum halves the gradient
    between its arguments, and so does the hand-written backward."""
    q = torch.zeros(1, 1, 2, 4, dtype=F64)
    k = torch.zeros(1, 1, 2, 4, dtype=F64)
    q[..., 0, 0], k[..., 0, 0] = 1.0, 2.0  # k / sqrt(4) . q = 1
    q[..., 1, :], k[..., 1, :] = torch.tensor([0.3, -0.2, 0.5, 0.1]), torch.tensor([0.7, 0.4, -0.6, 0.2])
    v = torch.tensor([[[[1.0, -2.0], [0.5, 0.25]]]], dtype=F64)
    i = torch.tensor([[[0.0, 0.3]]], dtype=F64)
    f = torch.tensor([[[1.0, 2.0]]], dtype=F64)
    inputs = [q, k, v, i, f]
    assert_same(run(mlstm_chunkwise_recompute, inputs, 16), run(mlstm_chunkwise, inputs, 16), tol=1e-14)


def test_no_double_backward():
    """The hand-written backward is not differentiable: asking for it is an error, not a wrong gradient."""
    q, k, v, i, f = (t.requires_grad_() for t in make_inputs(T=9))
    h, _ = mlstm_chunkwise_recompute(q, k, v, i, f, chunk_size=4)
    (dq,) = torch.autograd.grad(h.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()


def test_chunkwise_operator_passes_opcheck():
    """The chunk loop as custom operators (what torch.compile sees): schema, fake implementation (the number
    of saved states from a symbolic length), autograd registration."""
    from xlstm_hf.cells import _mlstm_prepare

    q, k, v, i, f, C, n, m = make_inputs(T=21, state=True)
    prepared = [t.detach().requires_grad_() for t in _mlstm_prepare(q, k, v, i, f, (C, n, m))]
    torch.library.opcheck(torch.ops.xlstm_hf.mlstm_chunkwise_forward.default, (*prepared, 1e-6, 8, 1))
    torch.library.opcheck(torch.ops.xlstm_hf.mlstm_chunkwise_forward.default, (*prepared, 1e-6, 8, 2))


def test_compiled_chunkwise_equals_eager_without_recompiling_per_length():
    """Under torch.compile the chunk loop is one operator: outputs, final state and gradients equal eager
    autograd through the loop (float64), and new lengths reuse one dynamic graph (the loop would otherwise
    be unrolled into a graph per length)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def loss(q, k, v, i, f, C, n, m):
        h, (C1, n1, m1) = mlstm_chunkwise(q, k, v, i, f, (C, n, m), output_final_state=True, chunk_size=8)
        return h.square().sum() + C1.sum() + n1.square().sum()

    # aot_eager: Dynamo and AOTAutograd as in training, without Inductor's code generation (fast)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for T in (21, 29, 37, 43):
        inputs = [t.requires_grad_() for t in make_inputs(T=T, state=True)]
        want_loss = loss(*inputs)
        want = torch.autograd.grad(want_loss, inputs)
        got_loss = compiled(*inputs)
        got = torch.autograd.grad(got_loss, inputs)
        assert rel_err(got_loss, want_loss) < 1e-12
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-10
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 2, f"{frames} graphs for 4 lengths: the loop is specialised per length"
