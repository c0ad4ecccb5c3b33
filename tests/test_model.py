"""The model: forms agree end to end, the cache works with generate(), padding is exact, save/load and
registration, bad input, training; config validation.

Every behaviour test runs for both block designs (the `design` fixture of conftest.py, also behind the
`model` fixture): the paper's mLSTM + sLSTM stack and xLSTM-7B's mLSTM-only "large" block.

Tolerances: float64 models agree across forms to 1e-9 relative (rounding only); generated tokens must be
identical.
"""

import pytest
import torch
from conftest import paper_only, randomise_, tiny_config, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import xlstm_hf
from xlstm_hf import xLSTMCache, xLSTMConfig, xLSTMForCausalLM, xLSTMModel
from xlstm_hf.modeling_xlstm import CACHE_NAME


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def stepwise_logits(model, ids, mask=None):
    cache = xLSTMCache(model.config)
    out = []
    for t in range(ids.shape[1]):
        m = None if mask is None else mask[:, : t + 1]
        out.append(model(ids[:, t : t + 1], attention_mask=m, past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("T", [1, 5, 8, 13, 16, 21])
def test_parallel_chunkwise_and_step_agree(T, design):
    model = tiny_model(dtype=torch.float64, design=design)
    ids = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        chunk = model(ids, use_cache=False).logits
        model.config.mlstm_mode = "parallel"
        par = model(ids, use_cache=False).logits
        step = stepwise_logits(model, ids)
    assert rel_err(par, chunk) < 1e-9
    assert rel_err(step, chunk) < 1e-9


def test_prefill_then_decode_equals_full_forward_float32(model):
    ids = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :17], use_cache=True).past_key_values
        assert cache.get_seq_length() == 17
        rest = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(17, 30)]
    assert rel_err(torch.cat(rest, 1), full[:, 17:]) < 1e-4


def test_long_input_prefill_then_step(design):
    """No maximum length: 4k+ tokens run, stay finite, and decoding from the prefilled state matches."""
    model = tiny_model(design=design, num_blocks=2, chunk_size=64, **paper_only(design, slstm_at=[1]))
    ids = torch.randint(0, 97, (1, 4100))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :4096], use_cache=True).past_key_values
        steps = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(4096, 4100)], 1)
    assert torch.isfinite(full).all()
    assert rel_err(steps, full[:, 4096:]) < 1e-4


def test_cache_memory_is_constant(model):
    with torch.no_grad():
        c1 = model(torch.randint(0, 97, (1, 5)), use_cache=True).past_key_values
        c2 = model(torch.randint(0, 97, (1, 50)), use_cache=True).past_key_values
    size = lambda c: sum(t.numel() for s in c.states for t in s.values() if t is not None)  # noqa: E731
    assert size(c1) == size(c2) > 0


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_cached_equals_uncached(model, num_beams):
    ids = torch.randint(1, 97, (2, 9))
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=num_beams)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_left_padded_batch_equals_single_prompts(model):
    prompts = [torch.randint(1, 97, (n,)) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for r, p in enumerate(prompts):
        batch[r, width - len(p):], mask[r, width - len(p):] = p, 1
    with torch.no_grad():
        padded_logits = model(batch, attention_mask=mask).logits
    kw = dict(max_new_tokens=8, do_sample=False)
    for beams in (1, 2):
        out = model.generate(batch, attention_mask=mask, num_beams=beams, **kw)
        for r, p in enumerate(prompts):
            with torch.no_grad():
                alone = model(p[None]).logits[0]
            assert rel_err(padded_logits[r, width - len(p):], alone) < 1e-5
            single = model.generate(p[None], num_beams=beams, **kw)
            assert torch.equal(out[r, width:], single[0, len(p):])


def test_padding_leaves_state_as_if_absent(design):
    model = tiny_model(dtype=torch.float64, design=design)
    p = torch.randint(1, 97, (1, 7))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), p], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1).long()
    with torch.no_grad():
        c1 = model(p, use_cache=True).past_key_values
        c2 = model(padded, attention_mask=mask, use_cache=True).past_key_values
    for s1, s2 in zip(c1.states, c2.states):
        for key in s1:
            assert torch.allclose(s1[key], s2[key], rtol=1e-10, atol=1e-12), key


def test_chunked_prefill_equals_one_shot(model):
    ids = torch.randint(1, 97, (2, 23))
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, prefill_chunk_size=5, **kw), model.generate(ids, **kw))


def test_continue_from_returned_cache(model):
    ids = torch.randint(1, 97, (2, 8))
    full = model.generate(ids, max_new_tokens=12, do_sample=False)
    first = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, CACHE_NAME)
    assert isinstance(cache, xLSTMCache)
    more = model.generate(first.sequences, max_new_tokens=6, do_sample=False, **{CACHE_NAME: cache})
    assert torch.equal(more, full)


def test_cache_argument_under_both_names(model):
    """transformers 5.24 renamed `past_key_values` to `cache`: forward takes either (generate() passes the
    installed version's name, which the tests above exercise) and refuses two different caches."""
    from xlstm_hf.modeling_xlstm import CACHE_NAME

    ids = torch.randint(1, 97, (2, 9))
    whole = model(ids).logits[:, -1]
    old, new = xLSTMCache(model.config), xLSTMCache(model.config)
    model(ids[:, :5], past_key_values=old, use_cache=True)
    out = model(ids[:, :5], cache=new, use_cache=True)
    assert getattr(out, CACHE_NAME) is new
    torch.testing.assert_close(model(ids[:, 5:], past_key_values=old).logits[:, -1], whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(ids[:, 5:], cache=new).logits[:, -1], whole, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=xLSTMCache(model.config), past_key_values=xLSTMCache(model.config))


def test_sampling_and_num_return_sequences(model):
    ids = torch.randint(1, 97, (2, 5))
    torch.manual_seed(0)
    a = model.generate(ids, do_sample=True, top_k=20, max_new_tokens=7, num_return_sequences=3)
    torch.manual_seed(0)
    b = model.generate(ids, do_sample=True, top_k=20, max_new_tokens=7, num_return_sequences=3, use_cache=False)
    assert a.shape == (6, 12) and torch.equal(a, b)


def test_streamer_and_pipeline_with_shipped_tokenizer(design):
    from transformers import TextIteratorStreamer, pipeline

    tok = xlstm_hf.load_gpt2_tokenizer()
    model = tiny_model(design=design, vocab_size=50304, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
                       num_blocks=2)
    ids = tok("Hello world", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert "".join(streamer) == tok.decode(out[0, ids.shape[1]:])
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    text = pipe("Hello world", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(out[0])


def test_save_and_load_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is xLSTMForCausalLM
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "xlstm_paper"


def test_tied_embeddings_round_trip(tmp_path, design):
    model = tiny_model(design=design, tie_word_embeddings=True)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_registration_leaves_transformers_xlstm_alone(design):
    from transformers import xLSTMConfig as HFxLSTMConfig
    from transformers import xLSTMForCausalLM as HFxLSTMForCausalLM
    from transformers import xLSTMModel as HFxLSTMModel

    assert type(AutoConfig.for_model("xlstm_paper")) is xLSTMConfig
    assert type(AutoConfig.for_model("xlstm")) is HFxLSTMConfig
    hf_cfg = HFxLSTMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2)
    assert type(AutoModelForCausalLM.from_config(hf_cfg)) is HFxLSTMForCausalLM
    assert type(AutoModel.from_config(hf_cfg)) is HFxLSTMModel
    ours = tiny_config(design)
    assert type(AutoModelForCausalLM.from_config(ours)) is xLSTMForCausalLM
    assert type(AutoModel.from_config(ours)) is xLSTMModel


def test_official_init_values(design):
    """Deterministic parts of the official init: gate weights and biases, norms, skip."""
    model = xLSTMForCausalLM(tiny_config(design, num_blocks=3, **paper_only(design, slstm_at=[2], slstm_num_heads=2)))
    mlstm = model.backbone.blocks[0].mlstm
    assert torch.allclose(mlstm.fgate.bias, torch.linspace(3, 6, 2)) and not mlstm.igate.weight.any()
    assert not mlstm.fgate.weight.any()
    assert torch.equal(model.backbone.final_norm.weight, torch.ones(32))
    norms = [m for name, m in model.named_modules() if name.endswith("norm")]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    if design == "large":  # xLSTM-7B: input gates closed at the start (bias -10); RMSNorm everywhere
        assert torch.equal(mlstm.igate.bias, torch.full((2,), -10.0))
        assert type(model.backbone.final_norm).__name__ == "RMSNorm"
        block = model.backbone.blocks[0]
        assert type(block.norm).__name__ == type(block.ffn_norm).__name__ == "RMSNorm"
        return
    assert torch.equal(mlstm.learnable_skip, torch.ones_like(mlstm.learnable_skip))
    slstm = model.backbone.blocks[2].slstm
    dh = 16
    expected = -(-5.0 + 12.0 * (torch.arange(dh) / (dh - 1)) ** (0.3 + 1.3 * 1.0))
    assert torch.allclose(slstm.bias[:, 1], expected.expand(2, dh))
    assert not slstm.recurrent_kernel.any() and not slstm.bias[:, [0, 2, 3]].any()


@pytest.mark.parametrize(
    "design, overrides, field",
    [
        ("paper", dict(hidden_size=0), "hidden_size"),
        ("paper", dict(slstm_at=[7]), "slstm_at"),
        ("paper", dict(slstm_at="seven:one"), "slstm_at"),
        ("paper", dict(mlstm_num_heads=3), "mlstm_num_heads"),
        ("paper", dict(slstm_num_heads=5), "slstm_num_heads"),
        ("paper", dict(ffn_act_fn="tanh"), "ffn_act_fn"),
        ("paper", dict(dropout=1.5), "dropout"),
        ("paper", dict(slstm_conv_kernel_size=-1), "slstm_conv_kernel_size"),
        ("paper", dict(mlstm_mode="fast"), "mlstm_mode"),
        ("paper", dict(chunk_size=0), "chunk_size"),
        ("paper", dict(block_design="huge"), "block_design"),
        ("large", dict(slstm_at=[1]), "slstm_at"),
        ("large", dict(slstm_at="all"), "slstm_at"),
        ("large", dict(gate_soft_cap=0.0), "gate_soft_cap"),
        ("large", dict(gate_soft_cap=-15), "gate_soft_cap"),
        ("large", dict(logits_soft_cap=0), "logits_soft_cap"),
        ("paper", dict(logits_soft_cap=-30.0), "logits_soft_cap"),
        ("large", dict(qk_dim_factor=0.0), "qk_dim_factor"),
        ("large", dict(v_dim_factor=-1.0), "v_dim_factor"),
        ("large", dict(mlstm_num_heads=3), "mlstm_num_heads"),
    ],
)
def test_invalid_config_names_the_field(design, overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(design, **overrides)


def test_large_design_config():
    """The xLSTM-7B preset, the large design's layout and widths, and its defaults."""
    config = xLSTMConfig.from_preset("xlstm-7b")
    expected = dict(block_design="large", vocab_size=50304, hidden_size=4096, num_blocks=32, slstm_at=[],
                    mlstm_num_heads=8, qk_dim_factor=0.5, v_dim_factor=1.0, ffn_proj_factor=2.667, ffn_round_up_to=64,
                    ffn_act_fn="swish", gate_soft_cap=15.0, logits_soft_cap=30.0, norm_eps=1e-6, mlstm_eps=1e-6,
                    use_bias=False, add_post_blocks_norm=True, tie_word_embeddings=False, chunk_size=64,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1)
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.layout == "xLSTM-large" and config.block_types == ["m"] * 32 and config.num_mlstm_blocks == 32
    # q/k at half the width, v at the full width: per head 256 and 512; SwiGLU 2.667 * 4096 rounded up to 64
    assert (config.mlstm_qk_dim, config.mlstm_v_dim, config.ffn_dim) == (2048, 4096, 10944)
    assert xLSTMConfig.from_preset("xlstm-7b", num_blocks=2).num_blocks == 2
    with pytest.raises(ValueError, match="unknown preset"):
        xLSTMConfig.from_preset("xlstm-70b")

    tiny = tiny_config("large")
    assert tiny.layout == "xLSTM-large" and tiny.slstm_at == [] and tiny.block_types == ["m"] * 3
    assert (tiny.mlstm_qk_dim, tiny.mlstm_v_dim, tiny.ffn_dim) == (16, 32, 88)  # round_up_to 8
    # the large design defaults to no sLSTM block; rounding to mlstm_round_up_to (default 64)
    config = xLSTMConfig(block_design="large", hidden_size=96, num_blocks=2, mlstm_num_heads=2, qk_dim_factor=0.5)
    assert config.slstm_at == [] and (config.mlstm_qk_dim, config.mlstm_v_dim) == (64, 128)
    # the paper design's q/k/v width is the up-projected inner width
    paper = tiny_config()
    assert paper.mlstm_qk_dim == paper.mlstm_v_dim == paper.mlstm_inner_dim == 64
    # a saved config keeps its design
    assert xLSTMConfig.from_dict(tiny.to_dict()).block_design == "large"


def test_logits_soft_cap(design):
    """With logits_soft_cap, the logits are cap * tanh(raw / cap) of the same model without the cap, so they lie
    in (-cap, cap); a small cap (3, where raw logits reach ~8) makes the cap matter."""
    capped = tiny_model(design=design, dtype=torch.float64, logits_soft_cap=3.0)
    uncapped = xLSTMForCausalLM(tiny_config(design, logits_soft_cap=None)).to(torch.float64).eval()
    uncapped.load_state_dict(capped.state_dict())
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        logits, raw = capped(ids).logits, uncapped(ids).logits
        step = capped(ids[:, :1], use_cache=True)
        step = capped(ids[:, 1:2], past_key_values=step.past_key_values).logits
    assert raw.abs().max() > 6.0  # the cap does bite
    assert logits.abs().max() < 3.0
    # (logits are returned in float32: the float64 model's agree to float32 rounding)
    torch.testing.assert_close(logits, 3.0 * torch.tanh(raw / 3.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step, logits[:, 1:2], rtol=1e-6, atol=1e-6)  # decoding is capped too
    # and the loss is computed on the capped logits
    loss = capped(ids, labels=ids).loss
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_slstm_at_ratio_notation():
    assert xLSTMConfig().slstm_at == [4, 12, 20] and xLSTMConfig().layout == "xLSTM[7:1]"
    assert tiny_config(num_blocks=8, slstm_at="7:1").slstm_at == [4]
    assert tiny_config(num_blocks=4, slstm_at="all").slstm_at == [0, 1, 2, 3]
    assert tiny_config(num_blocks=4, slstm_at="1:0").slstm_at == []


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5, 1))
    cache = model(torch.ones(2, 3, dtype=torch.long), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="batch size"):
        model(torch.ones(3, 1, dtype=torch.long), past_key_values=cache)
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_training_with_default_config_learns(design):
    """Train mode with the config defaults (use_cache=True in the config): loss falls on a fixed batch."""
    torch.manual_seed(0)
    model = xLSTMForCausalLM(tiny_config(design)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (4, 24))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # an explicit use_cache=True in training still backpropagates (no in-place state updates)
    out = model(ids, labels=ids, use_cache=True)
    out.loss.backward()
    assert isinstance(out.past_key_values, xLSTMCache)


def test_gradient_checkpointing_gives_same_gradients(design):
    model = tiny_model(dtype=torch.float64, design=design).train()
    ids = torch.randint(0, 97, (2, 12))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.activation_checkpointing_enable()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_left_padded_training_gradients_finite(model):
    model.train()
    ids = torch.randint(1, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bfloat16_model_runs_close_to_float32(model):
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.float32 and rel_err(low, ref) < 0.1


def test_randomise_helper_changes_every_parameter(design):
    a = xLSTMForCausalLM(tiny_config(design))
    b = randomise_(xLSTMForCausalLM(tiny_config(design)))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert not torch.equal(pa, pb), name


def test_passed_cache_is_advanced_consistently_even_without_use_cache(model):
    """A cache passed with use_cache=False is still read and advanced as a whole (never half-updated)."""
    ids = torch.randint(1, 97, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :7], use_cache=True).past_key_values
        out = model(ids[:, 7:8], past_key_values=cache, use_cache=False)
        assert out.past_key_values is None and cache.get_seq_length() == 8
        last = model(ids[:, 8:9], past_key_values=cache).logits
    assert rel_err(torch.cat([out.logits, last], 1), full[:, 7:]) < 1e-4


@pytest.mark.parametrize("mean_resizing", [False, True])
def test_resize_token_embeddings(tmp_path, design, mean_resizing):
    """resize_token_embeddings: old tokens' logits unchanged; new rows of the embedding and the head get the
    model's own init (normal, small-init std) or transformers' mean init; the head stays our Linear, so the
    compiled decode path works; the resized model saves and reloads; shrinking keeps the kept rows."""
    from xlstm_hf.modeling_xlstm import Linear, small_init_std

    model = tiny_model(design=design, compile_inference=True)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    torch.manual_seed(1)
    model.resize_token_embeddings(160, mean_resizing=mean_resizing)
    assert model.config.vocab_size == 160 and model.lm_head.weight.shape == (160, 32)
    assert type(model.lm_head) is Linear and model.lm_head.matvec_rows == 8
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape[-1] == 160
    torch.testing.assert_close(after[..., :97], before, rtol=0, atol=0)
    if not mean_resizing:
        for new_rows in (model.backbone.embeddings.weight[97:], model.lm_head.weight[97:]):
            assert abs(new_rows.std().item() / small_init_std(32) - 1) < 0.15 and abs(new_rows.mean().item()) < 0.02
    with torch.no_grad():  # compiled decoding through the resized head, against eager decoding
        prompt, kwargs = ids[:1, :4], dict(max_new_tokens=5, do_sample=False)
        compiled = model.generate(prompt, **kwargs)
        model.config.compile_inference = False
        assert torch.equal(model.generate(prompt, **kwargs), compiled)
    model.save_pretrained(tmp_path)
    reloaded = xLSTMForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, after, rtol=0, atol=0)
    kept = ids.clamp_max(89)
    with torch.no_grad():
        expected = reloaded(kept).logits[..., :90]
        model.resize_token_embeddings(90)
        torch.testing.assert_close(model(kept).logits, expected, rtol=0, atol=0)


def test_resize_token_embeddings_tied(design):
    model = tiny_model(design=design, tie_word_embeddings=True)
    model.resize_token_embeddings(128, mean_resizing=False)
    assert model.lm_head.weight is model.backbone.embeddings.weight and model.lm_head.weight.shape == (128, 32)
    with torch.no_grad():
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("bias_init", ["powerlaw_blockdependent", "small_init", "zeros"])
def test_slstm_bias_init_equals_official(bias_init):
    """The deterministic sLSTM bias inits against the official package's own cell (its external layout
    (NH, 4 gates i/f/z/o, DH), as ours): a forget-gate bias written to another gate slot fails here."""
    from xlstm.blocks.slstm.cell import sLSTMCell_vanilla, sLSTMCellConfig

    num_blocks, slstm_at, heads, width = 5, [1, 3], 2, 32
    model = xLSTMForCausalLM(tiny_config(num_blocks=num_blocks, slstm_at=slstm_at, slstm_num_heads=heads,
                                         slstm_bias_init=bias_init))
    for j in slstm_at:
        torch.manual_seed(0)
        official = sLSTMCell_vanilla(sLSTMCellConfig(hidden_size=width, num_heads=heads, backend="vanilla",
                                                     bias_init=bias_init, _block_idx=j, _num_blocks=num_blocks))
        official.reset_parameters()
        expected = official._bias_int2ext(official._bias_.data)
        assert expected.shape == (heads, 4, width // heads)
        torch.testing.assert_close(model.backbone.blocks[j].slstm.bias.data, expected, rtol=0, atol=1e-6)
    if bias_init != "zeros":
        assert model.backbone.blocks[slstm_at[0]].slstm.bias[:, 1].abs().min() > 0  # the forget gate's slot


@pytest.mark.parametrize("name", ["gelu", "relu", "relu^2", "sigmoid", "swish", "selu"])
def test_feedforward_activations_equal_official(name):
    from xlstm.components.feedforward import get_act_fn

    from xlstm_hf.configuration_xlstm import FFN_ACTIVATIONS
    from xlstm_hf.modeling_xlstm import activation

    assert name in FFN_ACTIVATIONS
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(activation(name)(x), get_act_fn(name)(x), rtol=1e-12, atol=1e-12)


def test_model_gradients_through_the_recomputing_mlstm_equal_the_reference(design, monkeypatch):
    """The memory-saving chunkwise mLSTM (backward recomputed from chunk-boundary states), swapped into the
    torch backend, gives a float64 model the gradients of autograd through the reference, with left padding, across chunks, continuing
    from a cache with the returned state in the loss."""
    from xlstm_hf import backends, cells

    model = tiny_model(design=design, dtype=torch.float64).train()
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :5] = 0

    def grads():
        model.zero_grad()
        first = model(ids[:, :9], attention_mask=mask[:, :9], use_cache=True)
        out = model(ids[:, 9:], attention_mask=mask, cache=first.past_key_values, use_cache=True, labels=ids[:, 9:])
        C = next(s["C"] for s in out.past_key_values.states if "C" in s)
        (out.loss + first.logits.square().mean() + C.square().mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    monkeypatch.setitem(backends.TORCH_OPS, "mlstm_chunkwise", cells.mlstm_chunkwise)
    reference = grads()
    monkeypatch.setitem(backends.TORCH_OPS, "mlstm_chunkwise", cells.mlstm_chunkwise_recompute)
    fast = grads()
    for name, grad in reference.items():
        torch.testing.assert_close(fast[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("features, blocks", [(1536, 384), (768, 4), (48, 12), (40, 10), (36, 3), (8, 8)])
def test_headwise_linear_equals_per_block_products(features, blocks):
    """The grouped block-diagonal matmul of HeadwiseLinear computes each block's own product (float64,
    values and gradients of input, weight and bias), for blocks narrower and wider than a group and block
    counts that do not divide evenly into groups."""
    from xlstm_hf.modeling_xlstm import HeadwiseLinear

    layer = HeadwiseLinear(features, blocks, bias=True, std=0.5).double()
    torch.nn.init.normal_(layer.bias)
    layer.group_min_rows = 1  # the grouped product (decoding's few rows take the per-block one)
    x = torch.randn(2, 7, features, dtype=torch.float64, requires_grad=True)
    ref = torch.einsum("bthi,hoi->btho", x.unflatten(-1, (blocks, -1)), layer.weight).flatten(-2) + layer.bias
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, layer.weight, layer.bias), dy)
    want = torch.autograd.grad(ref, (x, layer.weight, layer.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T, with_window", [(9, False), (2, False), (9, True), (2, True), (1, True)])
def test_causal_conv_equals_depthwise_conv1d(T, with_window):
    """CausalConv1d's shifted multiply-adds equal a depthwise F.conv1d over [window, x] (float64, values,
    carried window and gradients)."""
    import torch.nn.functional as F

    from xlstm_hf.modeling_xlstm import CausalConv1d

    conv = CausalConv1d(6, 4).double()
    x = torch.randn(2, T, 6, dtype=torch.float64, requires_grad=True)
    window = torch.randn(2, 3, 6, dtype=torch.float64) if with_window else None
    y, new_window = conv(x, window)
    xw = torch.cat([torch.zeros(2, 3, 6, dtype=torch.float64) if window is None else window, x], 1)
    ref = F.conv1d(xw.transpose(1, 2), conv.weight, conv.bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(new_window, xw[:, -3:])
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, conv.weight, conv.bias), dy),
                    torch.autograd.grad(ref, (x, conv.weight, conv.bias), dy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_cache", [False, True])
def test_long_inference_forward_in_segments_is_exact(design, with_cache, monkeypatch):
    """A long no-grad forward runs in segments of about PREFILL_SEGMENT_TOKENS tokens through a cache (here
    segments of one chunk, 8 tokens): the same hidden states, logits and final cache as one pass (float64),
    with left padding, from a carried cache or from none; never under autograd."""
    from xlstm_hf import modeling_xlstm

    model = tiny_model(design=design, dtype=torch.float64)
    ids = torch.randint(1, 97, (2, 37))
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :5] = 0
    calls = []
    original = xLSTMModel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(xLSTMModel, "forward", counting)

    def run(segment_tokens):
        monkeypatch.setattr(modeling_xlstm, "PREFILL_SEGMENT_TOKENS", segment_tokens)
        cache = None
        if with_cache:  # continue from a cache of a first part
            cache = xLSTMCache(model.config)
            with torch.no_grad():
                model(ids[:, :3], attention_mask=mask[:, :3], past_key_values=cache, use_cache=True)
        calls.clear()
        with torch.no_grad():
            out = model(ids[:, 3:], attention_mask=mask if with_cache else mask[:, 3:], past_key_values=cache,
                        use_cache=True)
        return out, len(calls)

    whole, one = run(1 << 30)
    parts, many = run(16)  # 2 rows x 8 tokens
    assert one == 1 and many == 1 + 5  # the outer call and one per segment of 8 of the 34 tokens
    assert (parts.logits - whole.logits).abs().max() < 1e-12
    for a, b in zip(parts.past_key_values.states, whole.past_key_values.states):
        for key in a:
            if a[key] is not None:
                assert (a[key] - b[key]).abs().max() < 1e-12, key
    calls.clear()
    model(ids, attention_mask=mask).logits.sum().backward()  # with gradients: one pass
    assert len(calls) == 1
