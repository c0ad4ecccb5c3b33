"""Packed sequences (issue 14): several documents in one row with `resets` (True where a document starts)
compute exactly what each document computes alone. float64, so the tolerance (1e-9 relative to the largest
entry) leaves room only for summation order."""

import pytest
import torch

from xlstm_hf import cells

TOL = 1e-9
# two rows of packed documents; in row 0 documents start inside chunks and exactly at a chunk boundary (16)
# for chunk size 8, and one document has a single token
DOCS = [[5, 11, 1, 8, 15], [40]]
T = 40


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def resets_of(docs):
    r = torch.zeros(len(docs), T, dtype=torch.bool)
    for row, lengths in enumerate(docs):
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
        r[row, starts] = True
    return r


def mlstm_inputs(seed=0, NH=2, DK=6, DV=5):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, NH, T, DK, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, NH, T, DV, generator=g, dtype=torch.float64)
    i = torch.randn(2, NH, T, generator=g, dtype=torch.float64)
    f = torch.randn(2, NH, T, generator=g, dtype=torch.float64) + 2.0
    return [t.requires_grad_() for t in (q, k, v, i, f)]


FORMS = {
    "parallel": cells.mlstm_parallel,
    "chunkwise (chunk 8)": lambda *a, **kw: cells.mlstm_chunkwise(*a, chunk_size=8, **kw),
    "chunkwise (one chunk)": lambda *a, **kw: cells.mlstm_chunkwise(*a, chunk_size=64, **kw),
    "chunkwise, recomputing backward": lambda *a, **kw: cells.mlstm_chunkwise_recompute(*a, chunk_size=8, **kw),
    "recurrent": cells.mlstm_recurrent,
}


@pytest.mark.parametrize("form", list(FORMS))
def test_mlstm_packed_documents_equal_each_alone(form):
    fn = FORMS[form]
    q, k, v, i, f = mlstm_inputs()
    resets = resets_of(DOCS)
    w = torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    h, _ = fn(q, k, v, i, f, resets=resets)
    grads = torch.autograd.grad((h * w).sum(), (q, k, v, i, f))
    # each document alone, from the zero state, with the reference chunkwise form
    alone = torch.zeros_like(h)
    alone_grads = [torch.zeros_like(t) for t in (q, k, v, i, f)]
    for row, lengths in enumerate(DOCS):
        start = 0
        for length in lengths:
            span = slice(start, start + length)
            parts = [t[row:row + 1, :, span].detach().requires_grad_() for t in (q, k, v, i, f)]
            h_doc, _ = cells.mlstm_chunkwise(*parts, chunk_size=4)
            alone[row:row + 1, :, span] = h_doc.detach()
            for acc, grad in zip(alone_grads, torch.autograd.grad((h_doc * w[row:row + 1, :, span]).sum(), parts)):
                acc[row:row + 1, :, span] = grad
            start += length
    assert rel_err(h, alone) < TOL
    for got, want in zip(grads, alone_grads):
        assert rel_err(got, want) < TOL
    # the resets matter: without them row 0 differs
    assert rel_err(fn(q, k, v, i, f)[0], alone) > 1e-3


def test_mlstm_reset_drops_the_initial_state_and_gives_final_state_of_last_document():
    q, k, v, i, f = mlstm_inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    state = (torch.randn(2, 2, 6, 5, generator=g, dtype=torch.float64),
             torch.randn(2, 2, 6, generator=g, dtype=torch.float64).abs(), torch.randn(2, 2, generator=g, dtype=torch.float64))
    resets = torch.zeros(2, T, dtype=torch.bool)
    resets[:, 23] = True  # row 0, 1: first 23 tokens continue the initial state, then a new document
    for fn in (lambda *a, **kw: cells.mlstm_chunkwise(*a, chunk_size=8, **kw), cells.mlstm_recurrent):
        h, final = fn(q, k, v, i, f, initial_state=state, output_final_state=True, resets=resets)
        first, _ = cells.mlstm_chunkwise(*(t[:, :, :23] for t in (q, k, v, i, f)), initial_state=state, chunk_size=8)
        second, final_alone = cells.mlstm_chunkwise(*(t[:, :, 23:] for t in (q, k, v, i, f)), output_final_state=True,
                                                    chunk_size=8)
        assert rel_err(h, torch.cat([first, second], dim=2)) < TOL
        for a, b in zip(final, final_alone):
            assert rel_err(a, b) < TOL


def test_slstm_reference_packed_documents_equal_each_alone():
    """The sLSTM reference with resets: each packed document from the zero state, outputs and gradients
    (the first document of row 1 continues the initial state, as a reset-free start does)."""
    NH, DH = 2, 3
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, T, NH, 4, DH, generator=g, dtype=torch.float64).requires_grad_()
    R = (0.5 * torch.randn(NH, DH, 4, DH, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(NH, 4, DH, generator=g, dtype=torch.float64).requires_grad_()
    state = [torch.randn(2, NH, DH, generator=g, dtype=torch.float64) for _ in range(4)]
    state[2] = state[2].abs() + 0.5
    resets = resets_of(DOCS)
    resets[1, 0] = False  # row 1: one document continuing the initial state
    w = torch.randn(2, T, NH, DH, generator=g, dtype=torch.float64)
    out, _ = cells.slstm_recurrent(x, R, b, initial_state=state, resets=resets)
    grads = torch.autograd.grad((out * w).sum(), (x, R, b))
    alone, loss = torch.zeros_like(out), 0.0
    for row, lengths in enumerate(DOCS):
        start = 0
        for length in lengths:
            span = slice(start, start + length)
            init = [s[row:row + 1] for s in state] if not resets[row, start] else None
            o, _ = cells.slstm_recurrent(x[row:row + 1, span], R, b, initial_state=init)
            alone[row:row + 1, span] = o.detach()
            loss = loss + (o * w[row:row + 1, span]).sum()
            start += length
    assert rel_err(out, alone) < TOL
    for got, want in zip(grads, torch.autograd.grad(loss, (x, R, b))):
        assert rel_err(got, want) < TOL
    assert rel_err(cells.slstm_recurrent(x, R, b, initial_state=state)[0], alone) > 1e-3
