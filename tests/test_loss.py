"""The language-model loss without (B, T, V) logits (`linear_cross_entropy`, used in training mode): the
same loss and gradients as transformers' ForCausalLMLoss on materialised logits, and no logits-sized
tensor on the way.

Tolerances: float64 agrees to rounding (1e-12); the model's float32 loss to 1e-6 relative (the chunked
logsumexp sums in another order)."""

import pytest
import torch
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import fixed_cross_entropy

from xlstm_hf import modeling_xlstm
from xlstm_hf.modeling_xlstm import linear_cross_entropy, soft_cap


def _inputs(B=3, T=11, H=8, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # ignored positions (e.g. left padding)
    return hidden, weight, labels


def _unfused_loss(logits, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None):
    """transformers' ForCausalLMLoss in the logits' own dtype (it upcasts to float32 only)."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return fixed_cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), num_items_in_batch,
                               ignore_index)


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": torch.tensor(13)}, {"ignore_index": 5}, "shift"])
def test_linear_cross_entropy_equals_unfused_loss(monkeypatch, cap, kwargs):
    monkeypatch.setattr(modeling_xlstm, "LOSS_CHUNK_ELEMENTS", 37 * 4)  # 4 rows a chunk: 9 chunks of 33 rows
    hidden, weight, labels = _inputs()
    if kwargs == "shift":  # already-shifted labels, as packed training passes them
        kwargs = {"shift_labels": torch.roll(labels, -1, dims=1)}
    if "ignore_index" in kwargs:
        labels = labels.masked_fill(labels == -100, kwargs["ignore_index"])
    ours = linear_cross_entropy(hidden, weight, labels, cap, **kwargs)
    expected = _unfused_loss(soft_cap(hidden @ weight.T, cap), labels, **kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(ours * 1.7, (hidden, weight))
    expected_grads = torch.autograd.grad(expected * 1.7, (hidden, weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_linear_cross_entropy_gradcheck():
    hidden, weight, labels = _inputs(B=2, T=4, H=3, V=5)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, labels, 2.0), (hidden, weight))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) that any operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_training_loss_without_logits(design, monkeypatch):
    """In training mode with labels, the loss and every parameter's gradient of a float64 model equal those of
    the materialised logits' float64 cross-entropy (transformers' own upcasts to float32 only), no tensor of
    B*T*V logits is ever made, and logits come back only for logits_to_keep positions."""
    V = 1000  # a vocabulary larger than the tiny model's widths, so that logits are its largest tensor
    monkeypatch.setattr(modeling_xlstm, "LOSS_CHUNK_ELEMENTS", V * 8)  # 8 positions per chunk
    model = tiny_model(design=design, vocab_size=V, dtype=torch.float64).train()
    ids = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.masked_fill(torch.arange(24) < 3, -100)
    hidden = model.backbone(ids).last_hidden_state
    logits = soft_cap(hidden @ model.lm_head.weight.T, model.config.logits_soft_cap)
    reference = _unfused_loss(logits, labels)
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with _LargestTensor() as probe:
        out = model(ids, labels=labels)
        out.loss.backward()
    assert out.logits is None
    assert probe.largest <= V * 32  # the (V, H) head and its gradient; never the 4 * 24 * V logits
    torch.testing.assert_close(out.loss, reference, rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    kept = model(ids, labels=labels, logits_to_keep=1)
    torch.testing.assert_close(kept.logits, logits[:, -1:].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kept.loss, reference, rtol=1e-12, atol=0)
    assert model(ids, labels=labels, return_dict=False)[0].dim() == 0  # (loss,) without logits
    unfused = model(ids, labels=labels, skip_logits=False)  # transformers' loss on float32 logits
    assert unfused.logits.shape == (4, 24, V)
    torch.testing.assert_close(unfused.loss.double(), reference, rtol=1e-6, atol=0)
    model.eval()
    assert model(ids, labels=labels).logits.shape == (4, 24, V)  # eval keeps HF's logits
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        model(ids, skip_logits=True)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_loss_operator_passes_opcheck(cap):
    """The loss is the custom operator xlstm_hf::linear_cross_entropy (its chunk loop opaque to torch.compile):
    schema, fake implementation and autograd registration pass opcheck, with and without gradients."""
    hidden, weight, labels = _inputs()
    targets = labels.reshape(-1)
    op = torch.ops.xlstm_hf.linear_cross_entropy.default
    torch.library.opcheck(op, (hidden.reshape(-1, 8).detach().requires_grad_(), weight, targets, cap, -100, 5, True, True))
    torch.library.opcheck(op, (hidden.reshape(-1, 8).detach(), weight.detach(), targets, cap, -100, 5, False, False))


def test_compiled_loss_does_not_recompile_per_length(monkeypatch):
    """Under torch.compile the number of loss chunks (here of 4 rows) does not specialise the graph: new
    lengths reuse one dynamic graph, with eager's loss and gradients."""
    import torch._dynamo

    monkeypatch.setattr(modeling_xlstm, "LOSS_CHUNK_ELEMENTS", 4 * 37)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y), backend="aot_eager", fullgraph=True)
    for T in (11, 13, 17, 19):
        hidden, weight, labels = _inputs(T=T)
        got = compiled(hidden, weight, labels)
        want = linear_cross_entropy(hidden, weight, labels)
        assert abs(got.item() - want.item()) < 1e-12
        for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
            assert (a - b).abs().max() < 1e-12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
