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


def slstm_inputs(seed, NH=2, DH=3):
    """float64 sLSTM inputs for two rows of T steps: x, R, the bias (all requiring grad), an initial state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, NH, 4, DH, generator=g, dtype=torch.float64).requires_grad_()
    R = (0.5 * torch.randn(NH, DH, 4, DH, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(NH, 4, DH, generator=g, dtype=torch.float64).requires_grad_()
    state = [torch.randn(2, NH, DH, generator=g, dtype=torch.float64) for _ in range(4)]
    state[2] = state[2].abs() + 0.5
    return x, R, b, state, g


def test_slstm_reference_packed_documents_equal_each_alone():
    """The sLSTM reference with resets: each packed document from the zero state, outputs and gradients
    (the first document of row 1 continues the initial state, as a reset-free start does)."""
    x, R, b, state, g = slstm_inputs(4)
    NH, DH = 2, 3
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


def test_slstm_by_document_equals_the_reference_with_resets():
    """The sLSTM of every backend runs packed rows one document per row (`cells.slstm_by_document`): with the
    torch backend's hand-written backward, padding inside and after documents and an initial state that a
    row's first document continues (row 0) or drops (row 1), outputs, final states and gradients equal the
    reference's resets (float64)."""
    from xlstm_hf.slstm_autograd import slstm_recurrent_bptt

    x, R, b, state, g = slstm_inputs(6)
    NH, DH = 2, 3
    state = [s.requires_grad_() for s in state]
    resets = resets_of(DOCS)
    resets[0, 0] = False
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, 7:9] = False
    mask[1, 30:] = False
    w = torch.randn(2, T, NH, DH, generator=g, dtype=torch.float64)
    results = []
    for run in (lambda *a: cells.slstm_recurrent(*a, resets=resets),
                lambda *a: cells.slstm_by_document(slstm_recurrent_bptt, *a, resets=resets)):
        out, final = run(x, R, b, state, True, mask)
        loss = (out * w).sum() + sum((s * (k + 1)).sum() for k, s in enumerate(final[:3]))
        results.append((out, *final[:3], *torch.autograd.grad(loss, (x, R, b, *state))))
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) < TOL


# --------------------------------------------------------------------------------------------------
# The model: packed rows from transformers' collator
# --------------------------------------------------------------------------------------------------

from conftest import DESIGNS, tiny_model  # noqa: E402
from transformers import DataCollatorWithFlattening  # noqa: E402

#: document lengths of one packed row: with chunk_size 8, documents start inside chunks and at 16 (a boundary)
LENGTHS = [5, 11, 1, 8, 15]
COLLATOR_FORMS = {
    "position_ids": dict(),
    "cu_seq_lens": dict(return_flash_attn_kwargs=True, return_position_ids=False),
    "seq_idx": dict(return_seq_idx=True, return_position_ids=False),
    "position_ids from 2": dict(position_ids_start=2),
}


def documents(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g).tolist() for n in lengths]


def packed(docs, **collator_kwargs):
    batch = DataCollatorWithFlattening(**collator_kwargs)([{"input_ids": d} for d in docs])
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def hidden_alone(model, docs):
    """The last hidden states of each document run alone, concatenated: (1, N, H)."""
    with torch.no_grad():
        return torch.cat([model.backbone(torch.tensor([d]), use_cache=False).last_hidden_state for d in docs], dim=1)


@pytest.mark.parametrize("form", list(COLLATOR_FORMS))
@pytest.mark.parametrize("design", DESIGNS)
def test_packed_row_equals_each_document_alone(design, form):
    """DataCollatorWithFlattening's row, in each of its forms: every document's hidden states equal that document
    alone (float64), in the parallel and chunkwise forms, and when a cache is returned (chunkwise with a state
    out); without the packing inputs, the documents would leak into each other."""
    model = tiny_model(design=design, dtype=torch.float64)
    docs = documents()
    batch = {k: v for k, v in packed(docs, **COLLATOR_FORMS[form]).items() if k != "labels"}
    want = hidden_alone(model, docs)
    with torch.no_grad():
        for mode in ("parallel", "chunkwise"):
            model.config.mlstm_mode = mode
            assert rel_err(model.backbone(**batch, use_cache=False).last_hidden_state, want) < TOL, mode
        assert rel_err(model.backbone(**batch, use_cache=True).last_hidden_state, want) < TOL
        assert rel_err(model.backbone(batch["input_ids"], use_cache=False).last_hidden_state, want) > 1e-3


@pytest.mark.parametrize("design", DESIGNS)
def test_packed_loss_and_gradients_equal_the_documents(design):
    """Training on the collator's row (labels -100 at each document's first token): the loss and every
    parameter's gradient equal those of the documents run alone, with the loss averaged over the same tokens
    (float64; the torch backend's training paths: the recomputing chunkwise mLSTM, the sLSTM's hand-written
    backward over one document per row)."""
    model = tiny_model(design=design, dtype=torch.float64).train()
    docs = documents(seed=1)
    batch = packed(docs)
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    total = sum(len(d) - 1 for d in docs)
    want_loss = sum(model(torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1)
                    for d in docs if len(d) > 1) / total
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    assert rel_err(loss, want_loss) < TOL
    for (name, _), got, ref in zip(model.named_parameters(), grads, want):
        assert rel_err(got, ref) < TOL, name


@pytest.mark.parametrize("design", DESIGNS)
def test_padded_packed_rows_and_the_returned_cache(design):
    """Several packed rows (position_ids restarting, left padding in row 0 and padding between documents in row 1):
    each document equals itself alone, and the returned cache holds each row's last document, so decoding
    continues it."""
    model = tiny_model(design=design, dtype=torch.float64)
    docs = documents([6, 9, 4, 4, 10], seed=2)
    rows = [[docs[0], docs[1]], [docs[2], docs[3], docs[4]]]
    ids = torch.zeros(2, 20, dtype=torch.long)
    positions = torch.ones(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        t = 5 if r == 0 else 0
        for d in row:
            if r == 1 and d is docs[3]:
                t += 2  # two padding tokens between documents
            ids[r, t:t + len(d)] = torch.tensor(d)
            positions[r, t:t + len(d)] = torch.arange(len(d))
            mask[r, t:t + len(d)] = 1
            spans.append((r, t, d))
            t += len(d)
    with torch.no_grad():
        out = model.backbone(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for r, t, d in spans:
            assert rel_err(out.last_hidden_state[r, t:t + len(d)], hidden_alone(model, [d])[0]) < TOL
        nxt = torch.tensor([[11], [12]])
        step = model.backbone(nxt, cache=out.past_key_values, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        for r, last in enumerate((docs[1], docs[4])):
            alone = model.backbone(torch.tensor([last + [nxt[r, 0].item()]]), use_cache=False).last_hidden_state
            assert rel_err(step.last_hidden_state[r, 0], alone[0, -1]) < TOL


@pytest.mark.parametrize("design", DESIGNS)
def test_position_zero_after_a_cache_starts_a_new_document(design):
    """Continuing from a cache, position_ids that restart at 0 at the first token drop the carried state (the
    next document of a stateful training stream); positions that continue keep it; a one-token step too."""
    model = tiny_model(design=design, dtype=torch.float64)
    first, second = documents([7, 9], seed=3)
    with torch.no_grad():
        for length in (9, 1):
            part = second[:length]
            cache = model.backbone(torch.tensor([first]), use_cache=True).past_key_values
            restarted = model.backbone(torch.tensor([part]), cache=cache, position_ids=torch.arange(length)[None]).last_hidden_state
            assert rel_err(restarted, hidden_alone(model, [part])) < TOL
            cache = model.backbone(torch.tensor([first]), use_cache=True).past_key_values
            continued = model.backbone(torch.tensor([part]), cache=cache,
                                       position_ids=torch.arange(7, 7 + length)[None]).last_hidden_state
            assert rel_err(continued, hidden_alone(model, [first + part])[:, 7:]) < TOL


def test_what_starts_a_document():
    """`document_starts`: generate()'s left-padded positions start nothing; restarts at any value do; position 0
    at a row's first token only with a carried state; padding never; cu_seq_lens only for one row."""
    from xlstm_hf.modeling_xlstm import document_starts

    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    generate_style = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
    assert document_starts(generate_style, {}, mask, 2, 5, has_state=False) is None
    assert document_starts(generate_style, {}, mask, 2, 5, has_state=True).nonzero().tolist() == [[0, 2], [1, 0]]
    restarts = torch.tensor([[2, 3, 2, 3, 4]])
    assert document_starts(restarts, {}, None, 1, 5, has_state=False).nonzero().tolist() == [[0, 2]]
    padded = torch.tensor([[0, 1, 0, 0, 1]])  # padding at 2 (position 0, never a start), then a document at 3
    assert document_starts(padded, {}, torch.tensor([[True, True, False, True, True]]), 1, 5, False).nonzero().tolist() == [[0, 3]]
    with pytest.raises(ValueError, match="one packed row"):
        document_starts(None, {"cu_seq_lens_q": torch.tensor([0, 2, 5])}, None, 2, 5, False)
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        document_starts(None, {"cu_seq_lens_q": torch.tensor([0, 2, 5]), "cu_seq_lens_k": torch.tensor([0, 3, 5])},
                        None, 1, 5, False)
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor of shape \(1, 5\)"):
        document_starts(torch.zeros(1, 4, dtype=torch.long), {}, None, 1, 5, False)


@pytest.mark.parametrize("design", DESIGNS)
def test_packed_row_on_the_triton_kernels(design):
    """The Triton backend (in the interpreter on CPU, fp32) on the collator's row: the mLSTM kernel with resets,
    the sLSTM kernel one document per row. Hidden states, loss and every gradient against the float64
    reference run document by document. Tolerances from fp32 rounding, measured with the torch backend in
    fp32 on the same row: hidden states <= 2.6e-6 (TOL 2e-5); gradients up to 4.7e-4 of their largest entry
    for the small, cancelling gradients of the input-gate biases (TOL 1e-3; the kernels measured <= 6.2e-5).
    A document that leaks into the next is off by O(1)."""
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    reference = tiny_model(design=design, dtype=torch.float64).train()
    model = tiny_model(design=design, kernel_backend="triton").train()
    docs = documents(seed=4)
    batch = packed(docs)
    out = model(**batch, output_hidden_states=True)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    assert rel_err(out.hidden_states[-1].double(), hidden_alone(reference, docs)) < 2e-5
    total = sum(len(d) - 1 for d in docs)
    want_loss = sum(reference(torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1)
                    for d in docs if len(d) > 1) / total
    want = torch.autograd.grad(want_loss, list(reference.parameters()))
    assert rel_err(out.loss.double(), want_loss) < 1e-5
    for (name, _), got, ref in zip(model.named_parameters(), grads, want):
        assert rel_err(got.double(), ref) < 1e-3, name


@pytest.mark.slow
def test_packed_row_under_torch_compile_equals_eager():
    """torch.compile traces the packed forward (the document starts stay tensors; the mLSTM takes its segmented
    operator): the loss and gradients of the collator's row equal eager's up to fp32 rounding of fused
    operations (measured 1e-6 on the loss, 4e-5 on gradients of up to ~1). The large design only: the
    paper design's sLSTM runs the reference's loop under compile, which compiles unrolled (~2 minutes here)."""
    model = tiny_model(design="large").train()
    batch = packed(documents())
    eager = model(**batch)
    want = torch.autograd.grad(eager.loss, list(model.parameters()))
    out = torch.compile(model)(**batch)
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    assert abs(out.loss.item() - eager.loss.item()) < 1e-5
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 5e-4
