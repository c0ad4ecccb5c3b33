"""LoRA with PEFT on xLSTM: targeting, training, merging, saving/reloading (merged and adapter-only), generate;
for both block designs.

What PEFT can target in xLSTM: the projections that are `nn.Linear` subclasses (our `Linear` and `GateLinear`).
Paper design: `mlstm.{up_proj, down_proj, igate, fgate}`, `ffn.{up_proj, down_proj}` and `lm_head`. The
block-diagonal `HeadwiseLinear` projections (`mlstm.{q,k,v}_proj` and the sLSTM gates
`slstm.{igate,fgate,zgate,ogate}`) are custom modules that PEFT's LoRA does not know, so `get_peft_model` raises
"Target module HeadwiseLinear() is not supported". Note that a bare "igate"/"fgate" would also match the sLSTM
gates: write "mlstm.igate". Large design (xLSTM-7B's block): every projection is a Linear, so
`mlstm.{q_proj, k_proj, v_proj, ogate, igate, fgate, down_proj}` and `ffn.{up_proj, down_proj}` can all be targeted.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import DESIGNS, randomise_, tiny_config
from xlstm_hf import xLSTMForCausalLM
from xlstm_hf.modeling_xlstm import GateLinear, Linear

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# PEFT (0.21) reads `model.is_gradient_checkpointing` in PeftModel.__init__, a property transformers 5.24
# deprecates with a FutureWarning, for every model; our code never reads it (test_lora_flow_reads_no_deprecated_property)
DEPRECATED_PROPERTY = "`is_gradient_checkpointing` is deprecated"
pytestmark = pytest.mark.filterwarnings(f"ignore:{DEPRECATED_PROPERTY}:FutureWarning")

TARGETS = {
    "paper": ["up_proj", "down_proj", "mlstm.igate", "mlstm.fgate"],
    "large": ["q_proj", "k_proj", "v_proj", "ogate", "mlstm.igate", "mlstm.fgate", "up_proj", "down_proj"],
}


def base_model(design: str = "paper") -> xLSTMForCausalLM:
    """The tiny test model with every weight perturbed, but by 0.1 rather than conftest's 0.3.

    At 0.3 the randomised gates put the tiny model in a regime where fp32 rounding is amplified ~3000x
    (a relative weight change of 1e-7 moves the logits by 3e-4; its fp32 and fp64 logits differ by 1e-4),
    which would swamp the merge comparison. At 0.1, fp32 vs fp64 logits differ by ~1e-6.
    """
    torch.manual_seed(0)
    return randomise_(xLSTMForCausalLM(tiny_config(design)), scale=0.1).eval()


def lora_config(design: str = "paper", **overrides) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[design], task_type="CAUSAL_LM")
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def batch(seed: int = 0, size: int = 4, length: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 97, (size, length), generator=gen)


@pytest.fixture(scope="module", params=DESIGNS)
def trained(request):
    """A LoRA model of each design trained for a few steps on a fixed batch: (peft model, losses, params before
    training, design)."""
    design = request.param
    torch.manual_seed(0)
    model = get_peft_model(base_model(design), lora_config(design))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = batch(size=4, length=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return model, losses, before, design


def test_lora_flow_reads_no_deprecated_property(monkeypatch, tmp_path):
    """README's LoRA flow (wrap, train, generate, save, reload, merge, save, load) warns about nothing that our code
    does: the only FutureWarning is `is_gradient_checkpointing`, and only PEFT reads that property."""
    import sys
    import warnings

    from transformers import PreTrainedModel

    readers = []
    deprecated = PreTrainedModel.is_gradient_checkpointing

    def is_gradient_checkpointing(self):
        readers.append(sys._getframe(1).f_code.co_filename)
        return deprecated.fget(self)

    monkeypatch.setattr(PreTrainedModel, "is_gradient_checkpointing", property(is_gradient_checkpointing))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = get_peft_model(base_model(), lora_config())
        ids = batch(size=2, length=16)
        lora.train()
        lora(input_ids=ids, labels=ids).loss.backward()
        lora.eval()
        lora.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        lora.save_pretrained(tmp_path / "adapter")
        merged = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").merge_and_unload()
        merged.save_pretrained(tmp_path / "merged")
        AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert readers and all("peft" in Path(filename).parts for filename in readers), readers
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and DEPRECATED_PROPERTY not in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


def test_lora_wraps_exactly_the_linear_projections(design):
    model = get_peft_model(base_model(design), lora_config(design))
    wrapped = sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                     if hasattr(module, "lora_A") and isinstance(module.base_layer, torch.nn.Module))
    if design == "paper":
        # tiny model: blocks 0, 2, 3 are mLSTM blocks, block 1 an sLSTM block (its feed-forward is targeted)
        layer = ("up_proj", "down_proj", "igate", "fgate")
        mlstm = [f"backbone.blocks.{j}.mlstm.{n}" for j in (0, 2, 3) for n in layer]
        expected = sorted(mlstm + [f"backbone.blocks.1.ffn.{n}" for n in ("up_proj", "down_proj")])
    else:
        # tiny model: 3 blocks, each an mLSTM layer (all of its projections) and a SwiGLU feed-forward
        layer = ("q_proj", "k_proj", "v_proj", "ogate", "igate", "fgate", "down_proj")
        expected = sorted([f"backbone.blocks.{j}.mlstm.{n}" for j in range(3) for n in layer]
                          + [f"backbone.blocks.{j}.ffn.{n}" for j in range(3) for n in ("up_proj", "down_proj")])
    assert wrapped == expected
    for name in expected:
        assert isinstance(model.get_submodule("base_model.model." + name).base_layer, (Linear, GateLinear))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)


@pytest.mark.parametrize("target", ["q_proj", "slstm.igate", "igate"])
def test_lora_cannot_target_headwise_linear(target):
    # HeadwiseLinear (block-diagonal weight of shape (blocks, out, in)) is not an nn.Linear; PEFT refuses it
    with pytest.raises(ValueError, match="HeadwiseLinear.*is not supported"):
        get_peft_model(base_model(), lora_config(target_modules=[target]))


def test_lora_training_lowers_loss_and_changes_only_lora_weights(trained):
    model, losses, before, _ = trained
    assert losses[-1] < 0.8 * losses[0], losses  # measured: 4.76 -> 2.91
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    lora = {name for name in before if ".lora_" in name}
    assert changed <= lora, sorted(changed - lora)
    assert {name for name in lora if ".lora_B." in name} <= changed  # every adapter learned something


def test_merge_and_unload_and_save_pretrained_reproduce_lora_logits(trained, tmp_path):
    model, _, _, design = trained
    ids = batch(seed=1, size=2, length=20)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        # the adapter does change the logits (else the comparisons below would prove nothing)
        assert (base_model(design)(input_ids=ids).logits - expected).abs().max() > 1e-2

        # adapter alone: small files, reloaded onto a fresh base model
        model.save_pretrained(tmp_path / "adapter")
        files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
        assert "adapter_config.json" in files and "adapter_model.safetensors" in files
        assert "model.safetensors" not in files
        reloaded = PeftModel.from_pretrained(base_model(design), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)

        # merged into plain xLSTM weights (merge_and_unload changes the wrapped model in place: do it last)
        merged = reloaded.merge_and_unload()
        assert type(merged) is xLSTMForCausalLM
        assert not any("lora" in name for name, _ in merged.named_parameters())
        assert type(merged.backbone.blocks[0].mlstm.down_proj) is Linear
        assert type(merged.backbone.blocks[0].mlstm.igate) is GateLinear
        merged_logits = merged(input_ids=ids).logits
        # W + (alpha/r) B A in place of W x + (alpha/r) B (A x): fp32 rounding only
        torch.testing.assert_close(merged_logits, expected, rtol=0, atol=1e-5)

        # in float64 the merge is exact up to 1e-12: the fp32 difference above is rounding, not a wrong merge
        model64 = PeftModel.from_pretrained(base_model(design).double(), tmp_path / "adapter").eval()
        lora64 = model64(input_ids=ids).logits
        torch.testing.assert_close(model64.merge_and_unload()(input_ids=ids).logits, lora64, rtol=0, atol=1e-12)

        merged.save_pretrained(tmp_path / "merged")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert type(loaded) is xLSTMForCausalLM
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged_logits, rtol=0, atol=0)


def test_generate_with_lora_model_cached_equals_uncached(trained):
    model, _, _, _ = trained
    prompt = batch(seed=2, size=2, length=7)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, use_cache=False, **kwargs)
        assert cached.shape == (2, 7 + 8)
        assert torch.equal(cached, uncached)
        # greedy from the last position of a plain forward agrees with the first generated token
        first = model(input_ids=prompt).logits[:, -1].argmax(-1)
        assert torch.equal(cached[:, 7], first)
