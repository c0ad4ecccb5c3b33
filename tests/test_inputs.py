"""What the forward accepts and refuses: attention masks of 0/1 only, position_ids that count up (packed rows
are tests/test_packing.py's), unknown keywords refused, and a forward that reads no tensor value where that would be a
data-dependent guard (torch.export) or a host sync (accelerators)."""

import pytest
import torch
from conftest import tiny_model


def _ids(batch=2, length=10, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded_mask(batch=2, length=10, pad=3):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0
    return mask


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.long, torch.float32, torch.bfloat16, torch.float64])
def test_zero_one_masks_of_every_dtype_mean_the_same(model, dtype):
    ids, mask = _ids(), _left_padded_mask()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        assert not torch.allclose(expected, model(ids).logits)  # the padding matters
        torch.testing.assert_close(model(ids, attention_mask=mask.to(dtype)).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("-inf"), -1e9])
def test_masks_other_than_zero_one_are_refused(model, value):
    """An additive mask (0 = keep, large negative = masked) means the opposite of ours: refused, not inverted."""
    mask = _left_padded_mask().float()
    mask[0, :3] = value
    with pytest.raises(ValueError, match=r"attention_mask must hold 1 for real tokens and 0 for padding.*additive"):
        model(_ids(), attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask must hold 1"):  # also where the bad values are not padding
        model(_ids(), attention_mask=torch.full((2, 10), value))


def test_complex_mask_is_refused(model):
    with pytest.raises(ValueError, match="bool, integer or float"):
        model(_ids(), attention_mask=torch.ones(2, 10, dtype=torch.complex64))


def test_contiguous_position_ids_are_accepted(model):
    """position_ids that count up by one over the real tokens (as some callers pass them) change nothing;
    padded positions may hold anything (transformers' convention puts 1 there)."""
    ids, mask = _ids(), _left_padded_mask()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits, expected,
                                   rtol=0, atol=0)
        torch.testing.assert_close(model(ids, position_ids=torch.arange(10).expand(2, 10) + 7).logits,
                                   model(ids).logits, rtol=0, atol=0)  # a continuation's positions


def test_generate_passes_no_position_ids(model):
    """generate() makes position_ids from the mask for models whose forward takes them; ours does not let it (a
    recurrent model needs none, and each step would look for document starts): no step receives them, and the
    tokens are those of the plain forward's argmax."""
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("position_ids")),
                                           with_kwargs=True)
    ids, mask = _ids(), _left_padded_mask()
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert len(seen) == 3 and all(p is None for p in seen)
    with torch.no_grad():
        first = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 10], first)


def test_unknown_keywords_and_output_attentions_are_refused(model):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['token_type_ids'\]"):
        model(_ids(), token_type_ids=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="no attention weights"):
        model(_ids(), output_attentions=True)
    model(_ids(), output_attentions=False)  # what generic callers pass
    ids = _ids()
    out = model(ids, labels=ids, num_items_in_batch=torch.tensor(9))  # Trainer's loss keyword reaches the loss
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1),
                                                 reduction="sum") / 9
    torch.testing.assert_close(out.loss, expected)


def test_forward_reads_no_values_off_cpu(design):
    """On a device whose values cannot be read (meta), the forward still runs: it reads no value where that
    would be a host sync (the id range check and the mask's checks run for CPU tensors only)."""
    model = tiny_model(design=design).to("meta")
    ids, mask = _ids().to("meta"), _left_padded_mask().to("meta")
    assert model(ids, attention_mask=mask, labels=ids).logits.shape == (2, 10, 97)
    cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    model(ids[:, :1], attention_mask=torch.ones(2, 11, device="meta"), past_key_values=cache)


def test_torch_export_traces_the_forward(design):
    """torch.export traces a padded forward without data-dependent guards; the exported program takes the
    mask as an input (another padding gives that padding's eager logits)."""
    model = tiny_model(design=design)
    ids, mask = _ids(), _left_padded_mask()
    with torch.no_grad():  # an inference program (with grad, the cells' autograd Functions would be traced)
        program = torch.export.export(model, (ids,), kwargs={"attention_mask": mask, "use_cache": False})
    other_ids, other_mask = _ids(seed=1), _left_padded_mask(pad=6).flip(0)
    # the exported program computes the mLSTM as one chunk (cells.mlstm_one_chunk: no loop over chunks, so the
    # length can stay dynamic) where eager inference takes chunks of 8, and the sLSTM as a scan of the
    # reference's steps: fp32 rounding in a different order through the exponential gating, ~1e-5 (the forms
    # are equal to 1e-12 in float64, tests/test_cells.py, tests/test_export.py)
    tol = 1e-4
    with torch.no_grad():
        for i, m in ((ids, mask), (other_ids, other_mask), (other_ids, torch.ones_like(other_mask))):
            torch.testing.assert_close(program.module()(i, attention_mask=m, use_cache=False).logits,
                                       model(i, attention_mask=m, use_cache=False).logits, rtol=tol, atol=tol)
