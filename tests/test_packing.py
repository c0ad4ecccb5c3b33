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


def test_causal_conv_with_positions_equals_each_document_alone():
    """The causal conv on packed rows (positions restarting at 0 per document): outputs and gradients equal
    F.conv1d over each document from a zero window (float64), and the returned window holds only the
    last document's inputs; a row whose first document continues a window (positions not starting at 0)
    reads that window."""
    import torch.nn.functional as F

    from xlstm_hf.modeling_xlstm import CausalConv1d

    K, Fe = 4, 3
    conv = CausalConv1d(Fe, K).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, T, Fe, generator=g, dtype=torch.float64).requires_grad_()
    window = torch.randn(2, K - 1, Fe, generator=g, dtype=torch.float64)
    docs = [[5, 11, 1, 8, 15], [2, 38]]
    positions = torch.zeros(2, T, dtype=torch.long)
    for row, lengths in enumerate(docs):
        start = 0
        for length in lengths:
            positions[row, start:start + length] = torch.arange(length)
            start += length
    positions[1, :2] += 7  # row 1's first document continues the window (it is at positions 7, 8)
    w = torch.randn(2, T, Fe, generator=g, dtype=torch.float64)
    y, new_window = conv(x, window, positions)
    grads = torch.autograd.grad((y * w).sum(), (x, conv.weight, conv.bias))
    want = torch.zeros_like(y)
    loss = 0.0
    for row, lengths in enumerate(docs):
        start = 0
        for length in lengths:
            part = x[row:row + 1, start:start + length]
            before = window[row:row + 1] if positions[row, start] > 0 else torch.zeros_like(window[:1])
            padded = torch.cat([before, part], dim=1).transpose(1, 2)
            out = F.conv1d(padded, conv.weight, conv.bias, groups=Fe).transpose(1, 2)
            want[row:row + 1, start:start + length] = out.detach()
            loss = loss + (out * w[row:row + 1, start:start + length]).sum()
            start += length
    assert rel_err(y, want) < TOL
    for got, ref in zip(grads, torch.autograd.grad(loss, (x, conv.weight, conv.bias))):
        assert rel_err(got, ref) < TOL
    # the window after row 0 (last document: 15 tokens) is its last 3 inputs; after a 1-token document it
    # would hold zeros before it
    assert torch.equal(new_window[0], x[0, -3:].detach())
    short = torch.zeros(1, 6, dtype=torch.long)
    short[0, 4], short[0, 5] = 0, 1  # a document of 2 tokens at the end
    _, win = conv(x[:1, :6].detach(), None, short)
    assert torch.equal(win[0, 0], torch.zeros(Fe, dtype=torch.float64)) and torch.equal(win[0, 1:], x[0, 4:6].detach())
