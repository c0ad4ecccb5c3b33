"""The compiled decode step (`config.compile_decode`, backends.decode_call) computes what the eager step does.

The compiled step sums the matrix-vector products in another order (a streaming loop instead of MKL's
GEMM), so logits agree to float32 rounding, not bitwise: the tolerance 1e-5 of max |logit| is ~100 ulps,
far below the effect of any wrong term (which is O(1)). Greedy tokens must be identical.
"""

import warnings

import pytest
import torch

from xlstm_hf import backends

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
    model = tiny_model(design=design, scale=0.1, compile_decode=False)
    ids = torch.randint(0, model.config.vocab_size, (batch, 14), generator=torch.Generator().manual_seed(1))
    eager = _decode_logits(model, ids, steps=5)
    model.config.compile_decode = True
    with torch.no_grad():
        assert model.backbone.decode_compiled(torch.device("cpu"))
    compiled = _decode_logits(model, ids, steps=5)
    assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
    prompt = ids[:, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        model.config.compile_decode = False
        expected = model.generate(prompt, **kwargs)
        model.config.compile_decode = True
        assert torch.equal(model.generate(prompt, **kwargs), expected)


def test_matvec_reference_is_linear():
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((2, 1, 24), (40, 24), (40,)))
    torch.testing.assert_close(backends.matvec_reference(x[:1], w, b), torch.nn.functional.linear(x[:1], w, b))
    torch.testing.assert_close(backends.matvec_reference(x, w, None), torch.nn.functional.linear(x, w))


def test_compile_decode_setting(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(backends.COMPILE_ENV_VAR, raising=False)
    assert not backends.compile_decode_enabled("auto", cpu, 1_000_000)  # small models: not worth compiling
    assert backends.compile_decode_enabled("auto", cpu, backends.AUTO_COMPILE_MIN_WEIGHTS)
    assert not backends.compile_decode_enabled("auto", torch.device("cuda"), 10**9)
    assert backends.compile_decode_enabled(True, cpu, 10) and not backends.compile_decode_enabled(False, cpu, 10**9)
    monkeypatch.setenv(backends.COMPILE_ENV_VAR, "0")
    assert not backends.compile_decode_enabled(True, cpu, 10**9)
    monkeypatch.setenv(backends.COMPILE_ENV_VAR, "1")
    assert backends.compile_decode_enabled(False, cpu, 10)
    with pytest.raises(ValueError, match="compile_decode"):
        tiny_model(compile_decode="yes")


def test_failed_compile_falls_back_to_eager(monkeypatch):
    model = tiny_model(scale=0.1, compile_decode=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    eager = _decode_logits(model, ids, steps=3)

    def broken_compile(module_class):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(backends, "_compiled_forward", broken_compile)
    monkeypatch.setattr(backends, "_compile_failed", False)
    model.config.compile_decode = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = _decode_logits(model, ids, steps=3)
    assert any("no C++ compiler" in str(w.message) for w in caught)
    assert torch.equal(fallback, eager)
    with torch.no_grad():
        assert not model.backbone.decode_compiled(torch.device("cpu"))  # off for the rest of the process
