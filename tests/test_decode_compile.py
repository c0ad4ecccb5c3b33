"""The compiled decode step (`config.compile_inference`, backends.decode_call) computes what the eager step does.

The compiled step sums the matrix-vector products in another order (a streaming loop instead of MKL's
GEMM), so logits agree to float32 rounding, not bitwise: the tolerance 1e-5 of max |logit| is ~100 ulps,
far below the effect of any wrong term (which is O(1)). Greedy tokens must be identical.
"""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from xlstm_hf import backends
from xlstm_hf.modeling_xlstm import inference_compiled

from conftest import tiny_model


def _decode_logits(model, ids, steps):
    """Prefill ids[:, :-steps], then feed the remaining tokens one at a time; the per-step logits."""
    with torch.no_grad():
        out = model(ids[:, :-steps], use_cache=True)
        cache, logits = out.past_key_values, []
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("design,batch", [
    ("paper", 1), ("large", 2),  # one row (the streaming matrix-vector form) and several (a GEMM inside the graph)
    pytest.param("paper", 3, marks=pytest.mark.slow), pytest.param("large", 1, marks=pytest.mark.slow),
])
def test_compiled_decode_equals_eager(design, batch):
    model = tiny_model(design=design, scale=0.1, compile_inference=False)
    ids = torch.randint(0, model.config.vocab_size, (batch, 14), generator=torch.Generator().manual_seed(1))
    eager = _decode_logits(model, ids, steps=5)
    model.config.compile_inference = True
    with torch.no_grad():
        assert inference_compiled(model, torch.device("cpu"), model.backbone.blocks)
    torch._dynamo.reset()
    counters.clear()
    compiled = _decode_logits(model, ids, steps=5)
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
    # one graph per block class and one for the head: the steps after a prefill, whose cache tensors
    # have other strides in their size-1 dimensions, and the later steps share it (no recompile)
    graphs = len({type(block) for block in model.backbone.blocks}) + 1
    assert counters["stats"]["unique_graphs"] == graphs
    prompt = ids[:, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        model.config.compile_inference = False
        expected = model.generate(prompt, **kwargs)
        model.config.compile_inference = True
        assert torch.equal(model.generate(prompt, **kwargs), expected)
    assert counters["stats"]["unique_graphs"] == graphs  # a new prompt length compiles nothing new


def test_matvec_reference_is_linear():
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((2, 1, 24), (40, 24), (40,)))
    torch.testing.assert_close(backends.matvec_reference(x[:1], w, b), torch.nn.functional.linear(x[:1], w, b))
    torch.testing.assert_close(backends.matvec_reference(x, w, None), torch.nn.functional.linear(x, w))


def test_compile_inference_setting(monkeypatch):
    cpu, width = torch.device("cpu"), backends.AUTO_COMPILE_MIN_WIDTH
    monkeypatch.delenv(backends.COMPILE_ENV_VAR, raising=False)
    assert not backends.compile_enabled("auto", cpu, width // 2)  # small models: not worth compiling
    assert backends.compile_enabled("auto", cpu, width)
    assert not backends.compile_enabled("auto", torch.device("cuda"), 4 * width)
    assert backends.compile_enabled(True, cpu, 8) and not backends.compile_enabled(False, cpu, 4 * width)
    monkeypatch.setattr(backends, "_said", set())
    monkeypatch.setenv(backends.COMPILE_ENV_VAR, "0")
    with pytest.warns(UserWarning, match="XLSTM_COMPILE=0 overrides"):
        assert not backends.compile_enabled(True, cpu, 4 * width)
    monkeypatch.setenv(backends.COMPILE_ENV_VAR, "1")
    with pytest.warns(UserWarning, match="XLSTM_COMPILE=1 overrides"):
        assert backends.compile_enabled(False, cpu, 8)
    with pytest.raises(ValueError, match="compile_inference"):
        tiny_model(compile_inference="yes")


def test_failed_compile_falls_back_to_eager(monkeypatch):
    model = tiny_model(scale=0.1, compile_inference=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    eager = _decode_logits(model, ids, steps=3)

    def broken_compile(fn, **options):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(backends, "_compile_failed", False)
    backends._compiled_forward.cache_clear()
    model.config.compile_inference = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = _decode_logits(model, ids, steps=3)
    assert any("no C++ compiler" in str(w.message) for w in caught)
    assert torch.equal(fallback, eager)
    with torch.no_grad():
        assert not inference_compiled(model, torch.device("cpu"), model.lm_head)  # off for the rest of the process
    backends._compiled_forward.cache_clear()  # later tests compile for real


def test_compiled_decoding_runs_module_hooks():
    """Forward hooks (a user's, or accelerate's device_map / offload hooks, which replace `forward` on the
    instance) run on every call with compile_inference on: the compiled path, which calls the blocks' class
    forward, is not taken while there are any. The hooked run's tokens equal the compiled run's."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model = tiny_model(scale=0.1, compile_inference=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        expected = model.generate(prompt, **kwargs)  # compiled decode steps
    calls = {"block": 0, "head": 0, "accelerate": 0}
    block, head = model.backbone.blocks[1], model.lm_head
    hooks = [block.register_forward_hook(lambda *_: calls.__setitem__("block", calls["block"] + 1)),
             head.register_forward_pre_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))]

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls["accelerate"] += 1
            return args, kwargs

    add_hook_to_module(model.backbone.blocks[0].mlstm.q_proj, Count())  # deep inside a block
    with torch.no_grad():
        tokens = model.generate(prompt, **kwargs)
    assert torch.equal(tokens, expected)
    assert calls == {"block": 5, "head": 5, "accelerate": 5}  # one prefill + 4 decode steps each
    for hook in hooks:
        hook.remove()
    remove_hook_from_module(model.backbone.blocks[0].mlstm.q_proj)
    with torch.no_grad():
        assert inference_compiled(model, torch.device("cpu"), model.backbone.blocks)  # compiled again
