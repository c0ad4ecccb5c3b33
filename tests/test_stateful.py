"""Truncated backpropagation through time (issue 14): a training-mode forward continues from a cache and
returns it advanced with the graph attached; `xLSTMCache.detach` cuts it; `stream_segments` lays long
documents out as consecutive segments in fixed batch rows; `StatefulTrainer` carries the detached state
from step to step, with gradient accumulation and resuming from a checkpoint.

Tiny models in float64 (conftest.py); the Trainer runs are plain SGD (no momentum, constant lr, no clipping),
so the weights after a run are a deterministic function of the gradients, and two runs that compute the same
gradients agree to rounding."""

import pytest
import torch
from conftest import tiny_model
from transformers import Trainer, TrainingArguments

from xlstm_hf import xLSTMCache
from xlstm_hf.train import CARRIED_STATE_FILE, StatefulTrainer, stream_segments

TOL = 1e-9


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def ids(length, seed=0, batch=2):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("design", ["paper", "large"])
def test_segments_with_a_carried_cache_equal_the_whole_sequence(design):
    """In training mode, segments of 5, 1, 8, 16 and 7 tokens, each continuing the cache the previous one returned
    (graph attached), give the whole sequence's hidden states and the same gradients for every parameter
    (float64); the cache passed in is the one returned, advanced."""
    model = tiny_model(design=design, dtype=torch.float64).train()
    x = ids(37)
    w = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = model.backbone(x, use_cache=False).last_hidden_state
    want = torch.autograd.grad((full * w).sum(), list(model.backbone.parameters()))
    cache, parts, start = xLSTMCache(model.config), [], 0
    for length in (5, 1, 8, 16, 7):
        out = model.backbone(x[:, start:start + length], cache=cache, use_cache=True)
        assert out.past_key_values is cache
        parts.append(out.last_hidden_state)
        start += length
    hidden = torch.cat(parts, dim=1)
    assert rel_err(hidden, full) < TOL
    for (name, _), got, ref in zip(model.backbone.named_parameters(), torch.autograd.grad((hidden * w).sum(),
                                                                                 list(model.backbone.parameters())), want):
        assert rel_err(got, ref) < TOL, name


def test_detach_cuts_the_graph_and_keeps_the_values(design):
    """`cache.detach()` is a copy with the same values and no history: the next segment's backward stops at the
    boundary (the first segment's inputs get no gradient), and the values continue exactly; the cache it came
    from keeps its graph."""
    model = tiny_model(design=design, dtype=torch.float64).train()
    x = ids(20, seed=2)
    embeds = model.backbone.embeddings(x[:, :12]).detach().requires_grad_()
    cache = model.backbone(inputs_embeds=embeds, use_cache=True).past_key_values
    cut = cache.detach()
    assert cut is not cache and cut.seen_tokens == cache.seen_tokens == 12
    pairs = [(a, b) for s, t in zip(cache.states, cut.states) for a, b in zip(s.values(), t.values()) if a is not None]
    assert all(torch.equal(a, b) and not b.requires_grad for a, b in pairs)
    assert any(a.requires_grad for a, _ in pairs)
    second = model.backbone(x[:, 12:], cache=cut, use_cache=True).last_hidden_state
    second.sum().backward()
    assert embeds.grad is None
    with torch.no_grad():
        whole = model.backbone(x, use_cache=False).last_hidden_state[:, 12:]
    assert rel_err(second.detach(), whole) < TOL
    # the attached cache: the backward reaches the first segment
    model.backbone(x[:, 12:], cache=cache, use_cache=True).last_hidden_state.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def _documents(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=g).tolist() for n in lengths]


def test_stream_segments_lay_documents_out_in_fixed_rows():
    """Every stream is whole documents end to end; segment k of stream s is item (k * streams + s); positions
    restart at each document; shift_labels are the stream's next tokens, -100 before a document start and past
    the end; the segments' losses add up to the documents' (each target counted once)."""
    docs = _documents([30, 7, 19, 3, 12, 25, 9])
    data = stream_segments(docs, rows=2, segment_length=8, accumulation=2, pad_token_id=0)
    streams = 4
    assert len(data) % streams == 0
    steps = len(data) // streams
    targets = 0
    rebuilt = []
    for s in range(streams):
        rows = [data[k * streams + s] for k in range(steps)]
        ids_ = [t for r in rows for t, m in zip(r["input_ids"], r["attention_mask"]) if m]
        pos = [p for r in rows for p, m in zip(r["position_ids"], r["attention_mask"]) if m]
        labels = [lab for r in rows for lab in r["shift_labels"]]
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(ids_)]
        for a, b in zip(starts, starts[1:]):
            rebuilt.append(ids_[a:b])
            assert pos[a:b] == list(range(b - a))
            assert labels[a:b - 1] == ids_[a + 1:b] and labels[b - 1] == -100
        assert all(lab == -100 for lab in labels[len(ids_):])
        targets += sum(lab != -100 for lab in labels)
    assert sorted(rebuilt) == sorted(docs)
    assert targets == sum(len(d) - 1 for d in docs)
    with pytest.raises(ValueError, match="cannot fill 8 streams"):
        stream_segments(docs, rows=4, segment_length=8, accumulation=2)


def _args(tmp_path, **overrides):
    kwargs = dict(use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
                  dataloader_pin_memory=False, seed=0, optim="sgd", learning_rate=0.05, lr_scheduler_type="constant",
                  max_grad_norm=0.0, per_device_train_batch_size=2)
    kwargs.update(overrides)
    return TrainingArguments(str(tmp_path), **kwargs)


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _manual_tbptt(design, data, rows, accumulation, steps, lr=0.05):
    """The reference: truncated BPTT written out with the model's own API (a cache per micro-batch slot, cut
    with detach() after each segment; the step's loss over the step's counted targets; SGD)."""
    model = tiny_model(design=design, dtype=torch.float64).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # (Trainer's optim="sgd": the same update, bitwise)
    caches = [xLSTMCache(model.config) for _ in range(accumulation)]
    per_step = rows * accumulation
    for step in range(steps):
        k = step % (len(data) // per_step)
        batches = [data[(k * accumulation + j) * rows:(k * accumulation + j + 1) * rows] for j in range(accumulation)]
        batches = [{key: torch.tensor(v) for key, v in b.items()} for b in batches]
        count = sum((b["shift_labels"] != -100).sum() for b in batches)
        for j, b in enumerate(batches):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                         shift_labels=b["shift_labels"], cache=caches[j], use_cache=True, num_items_in_batch=count).loss
            loss.backward()
            caches[j] = caches[j].detach()
        optimizer.step()
        optimizer.zero_grad()
    return _params(model)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stateful_trainer_equals_truncated_bptt_written_out(tmp_path, design, accumulation):
    """StatefulTrainer over stream_segments (documents longer than a segment and ending inside segments; 10 steps:
    a second pass over the data, which starts every row afresh) reaches the weights of truncated BPTT written out by hand, with and
    without gradient accumulation. Control: the plain Trainer on the same rows (no carried state) ends
    elsewhere."""
    docs = _documents([30, 7, 19, 3, 12, 25, 9, 14])
    data = stream_segments(docs, rows=2, segment_length=8, accumulation=accumulation)
    steps = 10
    model = tiny_model(design=design, dtype=torch.float64).train()
    args = _args(tmp_path, gradient_accumulation_steps=accumulation, max_steps=steps)
    StatefulTrainer(model=model, args=args, train_dataset=data).train()
    want = _manual_tbptt(design, data, 2, accumulation, steps)
    assert _max_diff(_params(model), _params(tiny_model(design=design, dtype=torch.float64))) > 0.05
    assert _max_diff(_params(model), want) < 1e-10
    plain = tiny_model(design=design, dtype=torch.float64).train()
    Trainer(model=plain, args=_args(tmp_path, gradient_accumulation_steps=accumulation, max_steps=steps,
                                    train_sampling_strategy="sequential", remove_unused_columns=False),
            train_dataset=data).train()
    assert _max_diff(_params(plain), want) > 1e-3


def test_stateful_trainer_resumes_exactly(tmp_path):
    """Interrupted after step 3 (checkpoint with the carried states) and resumed: the same weights as the
    uninterrupted run. A checkpoint without the carried states is refused."""
    docs = _documents([30, 7, 19, 3, 12, 25, 9, 14], seed=4)
    data = stream_segments(docs, rows=2, segment_length=8, accumulation=2)

    def run(output, max_steps, resume=None, **kw):
        model = tiny_model(dtype=torch.float64).train()
        args = _args(output, gradient_accumulation_steps=2, max_steps=max_steps, **kw)
        StatefulTrainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return _params(model)

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "cut", 3, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    assert (checkpoint / CARRIED_STATE_FILE).is_file()
    resumed = run(tmp_path / "cut", 6, resume=str(checkpoint))
    assert _max_diff(resumed, whole) < 1e-10
    (checkpoint / CARRIED_STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CARRIED_STATE_FILE):
        run(tmp_path / "cut", 6, resume=str(checkpoint))
