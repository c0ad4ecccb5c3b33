"""The recurrent state as a transformers Cache, compiled generate(), and export through transformers' exporters.

Every exported program is checked the same way: run step by step through its runners (`generate_exported`),
on a left-padded batch, it must give eager generate()'s greedy tokens, with logits within 1e-4. The exported
forms compute the mLSTM as one chunk and the sLSTM as a scan (see xlstm_hf/export.py), so fp32 logits differ
from eager's chunks of 8 by rounding (~3e-5 measured); in float64 the forms agree to 1e-12
(test_export_forms_equal_the_eager_forms_in_float64).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import tiny_model
from transformers import CompileConfig
from transformers.cache_utils import Cache, LinearAttentionLayer

from xlstm_hf import xLSTMCache
from xlstm_hf.export import check_format, example_inputs, export_model, generate_exported, state_names

needs = lambda *names: pytest.mark.skipif(  # noqa: E731
    any(importlib.util.find_spec(n) is None for n in names), reason=f"needs {', '.join(names)}")


def _batch(seed=3, batch=3, length=7, vocab=97):
    """A left-padded batch other than the one exports are traced with (example_inputs: 2 x 8)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0
    mask[-1, :1] = 0
    return ids, mask


def _check_generation(exported, model, ids, mask, new=6, tol=1e-4):
    tokens, logits = generate_exported(exported, ids, mask, max_new_tokens=new)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert torch.equal(tokens, ref.sequences[:, ids.shape[1]:])
    worst = max((a - b).abs().max().item() for a, b in zip(logits, ref.logits))
    assert worst < tol, worst
    return worst


# --------------------------------------------------------------------------------------------------
# The cache on transformers' Cache API
# --------------------------------------------------------------------------------------------------


def test_cache_is_a_transformers_cache_of_linear_attention_layers(model):
    ids, mask = _batch()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    assert isinstance(cache, Cache) and cache.is_compileable and not cache.is_croppable
    assert all(isinstance(layer, LinearAttentionLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 7 and cache.batch_size == 3 and cache.has_previous_state()
    for kind, layer, state in zip(model.config.block_types, cache.layers, cache.states):
        assert layer.names == (("C", "n", "m") if kind == "m" else ("h", "c", "n", "m"))
        for i, name in enumerate(layer.names):
            assert state[name] is layer.recurrent_states[i]
        if layer.is_conv_states_initialized[0]:  # the library's layout: time last
            kernel = model.config.mlstm_conv_kernel_size if kind == "m" else model.config.slstm_conv_kernel_size
            assert layer.conv_states[0].shape[-1] == kernel - 1
            assert torch.equal(state["conv"], layer.conv_states[0].transpose(1, 2))


def test_decode_steps_update_the_buffers_in_place(model):
    """Static addresses (what CUDA graphs replay on): every decode step writes into the prefill's buffers."""
    ids, mask = _batch()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        addresses = [t.data_ptr() for t in pytree.tree_leaves(cache)]
        for token in (5, 9, 11):
            model(torch.full((3, 1), token), cache=cache, use_cache=True)
    assert [t.data_ptr() for t in pytree.tree_leaves(cache)] == addresses
    assert cache.get_seq_length() == 10


def test_reset_offload_and_prefetch(model):
    ids, mask = _batch()
    with torch.no_grad():
        fresh = model(ids, attention_mask=mask, use_cache=True).logits
        cache = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True).past_key_values
        leaves = [t.clone() for t in pytree.tree_leaves(cache)]
        for layer in cache.layers:
            layer.offload()
            layer.prefetch()
        assert all(torch.equal(a, b) for a, b in zip(leaves, pytree.tree_leaves(cache)))
        cache.reset()  # back to the empty state (m = -inf, not the zeros a reset buffer holds)
        assert cache.get_seq_length() == 0 and not cache.has_state
        again = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_cache_pytree_round_trip_and_a_fixed_spec(model):
    """Flattened and rebuilt, the cache continues identically; its spec (what an exported decode step was traced
    with) is the same after every decode step, and survives serialisation."""
    ids, mask = _batch()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        leaves, spec = pytree.tree_flatten(cache)
        rebuilt = pytree.tree_unflatten([t.clone() for t in leaves], spec)
        a = model(torch.full((3, 1), 7), cache=cache, use_cache=True).logits
        b = model(torch.full((3, 1), 7), cache=rebuilt, use_cache=True).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert pytree.tree_flatten(cache)[1] == spec == pytree.tree_flatten(rebuilt)[1]
    assert pytree.treespec_loads(pytree.treespec_dumps(spec)) == spec
    assert [key for key, _ in pytree.tree_flatten_with_path(cache)[0]][-1][0].key == "seen"


def test_detach_and_from_states_keep_the_values(model):
    """`from_states` (a checkpoint's saved states) rebuilds a cache in buffers of its own that continues
    identically; `detach` keeps the values (sharing their storage, as Tensor.detach does)."""
    ids, mask = _batch()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        detached = cache.detach()
        assert pytree.tree_flatten(detached)[1] == pytree.tree_flatten(cache)[1]
        assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(detached), pytree.tree_leaves(cache)))
        copy = xLSTMCache.from_states(cache.states, cache.get_seq_length())
        ref = model(torch.full((3, 1), 7), cache=cache, use_cache=True).logits
        torch.testing.assert_close(model(torch.full((3, 1), 7), cache=copy, use_cache=True).logits, ref,
                                   rtol=0, atol=0)
        assert copy.get_seq_length() == cache.get_seq_length() == 8


# --------------------------------------------------------------------------------------------------
# generate() compiled
# --------------------------------------------------------------------------------------------------


def test_compiled_generate_compiles_the_decode_step_once_per_batch_size(design):
    """generate(compile_config=...) compiles the decode step once: no recompile per token, none for another
    prompt (length or padding), one more for another batch size; the tokens are eager's. (Dynamo's own backend
    "eager": the guards and graphs are Dynamo's, whatever the backend; Inductor is the slow test below.)"""
    import torch._dynamo

    model = tiny_model(design=design)
    config = CompileConfig(fullgraph=True, backend="eager", mode="default")
    config._compile_all_devices = True  # (generate() compiles on CUDA only, unless told)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    graphs = []
    for batch, length in ((3, 7), (3, 10), (2, 5)):
        ids, mask = _batch(seed=length, batch=batch, length=length)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, compile_config=config)
        assert torch.equal(out, ref)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 2], graphs
    torch._dynamo.reset()


def test_generate_does_not_compile_unless_asked(model, monkeypatch):
    from transformers import GenerationConfig

    ids, mask = _batch()
    kwargs = {"cache": xLSTMCache(model.config)}
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert not model._valid_auto_compile_criteria(kwargs, GenerationConfig())
    assert model._valid_auto_compile_criteria(kwargs, GenerationConfig(compile_config=CompileConfig()))


@pytest.mark.slow
def test_compiled_generate_with_inductor(design):
    import torch._dynamo

    model = tiny_model(design=design)
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids, mask = _batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                      compile_config=config), ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# The exported forms
# --------------------------------------------------------------------------------------------------


def test_export_forms_equal_the_eager_forms_in_float64():
    """What an export computes (mLSTM as one chunk, sLSTM as a scan) equals the eager forms, float64, 1e-12:
    with a state in, padding, and resets."""
    from xlstm_hf import cells

    g = torch.Generator().manual_seed(0)
    B, NH, T, D = 2, 2, 11, 4
    q, k, v = (torch.randn(B, NH, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    i, f = (torch.randn(B, NH, T, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    state = cells.mlstm_recurrent(q, k, v, i, f, output_final_state=True)[1]
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[1, 5] = True
    for initial, reset in ((None, None), (state, None), (state, resets)):
        a = cells.mlstm_one_chunk(q, k, v, i, f, initial, True, resets=reset)
        b = cells.mlstm_chunkwise(q, k, v, i, f, initial, True, chunk_size=4, resets=reset)
        for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)

    x = torch.randn(B, T, NH, 4, D, generator=g, dtype=torch.float64)
    kernel = torch.randn(NH, D, 4, D, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(NH, 4, D, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False

    class SLSTM(torch.nn.Module):
        def forward(self, x, mask):
            return cells.slstm_recurrent(x, kernel, bias, None, True, mask)

    program = torch.export.export(SLSTM(), (x, mask), dynamic_shapes=({1: torch.export.Dim("T")}, {1: torch.export.Dim("T")}))
    assert "scan" in str(program.graph)
    for length in (T, 4):
        got = program.module()(x[:, :length], mask[:, :length])
        ref = cells.slstm_recurrent(x[:, :length], kernel, bias, None, True, mask[:, :length])
        for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(ref)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Exporters
# --------------------------------------------------------------------------------------------------


def test_dynamo_export_for_generation(design, tmp_path):
    """Dynamic shapes: traced on 2 x 8, run on 3 x 7 and 1 x 12; saved and loaded back in a fresh process."""
    model = tiny_model(design=design)
    exported = export_model(model, "dynamo")
    _check_generation(exported, model, *_batch())
    _check_generation(exported, model, *_batch(seed=5, batch=1, length=12))
    _round_trip(exported, model, tmp_path, "trust_remote_code=True")


def _round_trip(exported, model, tmp_path, load_kwargs=""):
    """save_pretrained, then from_pretrained in a fresh process (which must find the cache's pytree
    registration through `import xlstm_hf`): the loaded export's tokens and logits are the original's."""
    exported.save_pretrained(tmp_path / "export")
    ids, mask = _batch()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    tokens, logits = generate_exported(exported, ids, mask, max_new_tokens=5)
    script = f"""
import torch, xlstm_hf
from transformers.exporters import ExportedModel
from xlstm_hf.export import generate_exported
exported = ExportedModel.from_pretrained({str(tmp_path / 'export')!r}, {load_kwargs})
inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
tokens, logits = generate_exported(exported, inputs["ids"], inputs["mask"], max_new_tokens=5)
torch.save({{"tokens": tokens, "logits": logits}}, {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    loaded = torch.load(tmp_path / "out.pt")
    assert torch.equal(loaded["tokens"], tokens)
    for a, b in zip(loaded["logits"], logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dynamo_export_with_static_shapes_refuses_other_shapes():
    model = tiny_model(num_blocks=2, slstm_at=[1])
    exported = export_model(model, "dynamo", dynamic=False, batch_size=3, prompt_length=7)
    _check_generation(exported, model, *_batch())
    with pytest.raises(ValueError, match=r"static shapes: its prefill takes input_ids of shape \(3, 7\)"):
        generate_exported(exported, *_batch(length=8))


def test_dynamo_export_of_the_forward(design):
    """transformers' single-graph `export` of the forward (no cache): another length, another padding."""
    from transformers.exporters import DynamoConfig, DynamoExporter

    _check_forward_export(tiny_model(design=design), DynamoExporter(), DynamoConfig(dynamic=True))


def _check_forward_export(model, exporter, config):
    """`exporter.export` of the forward (no cache), traced on 2 x 8, run on another length and padding: the
    model's logits within 1e-4."""
    exported = exporter.export(model, {**example_inputs(model.config), "use_cache": False}, config)
    ids, mask = _batch(length=11)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=mask)["logits"],
                                   model(ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)


@needs("onnx", "onnxscript", "onnxruntime")
@pytest.mark.parametrize("design_", ["paper", pytest.param("large", marks=pytest.mark.slow)])
def test_onnx_export_for_generation(design_, tmp_path):
    model = tiny_model(design=design_)
    exported = export_model(model, "onnx")
    _check_generation(exported, model, *_batch())
    _check_generation(exported, model, *_batch(seed=5, batch=1, length=12))
    decode = exported.runners["decode"].session
    with torch.no_grad():
        cache = model(**example_inputs(model.config), use_cache=True).cache
    names = state_names(cache)  # what the README and `xlstm-hf export` list
    assert [i.name for i in decode.get_inputs()] == ["input_ids", "attention_mask", *(f"input.{n}" for n in names)]
    assert [o.name for o in decode.get_outputs()] == ["logits", *(f"output.{n}" for n in names)]
    assert [o.name for o in exported.runners["prefill"].session.get_outputs()] == ["logits", *names]
    assert names["cache.seen"] == () and names["cache.layers.0.recurrent_states.0"] == tuple(
        cache.layers[0].recurrent_states[0].shape) == (2, model.config.mlstm_num_heads, 8 if design_ == "large" else 32,
                                                      16 if design_ == "large" else 32)
    _round_trip(exported, model, tmp_path)
    _onnxruntime_alone(tmp_path / "export", model)


@needs("onnx", "onnxscript", "onnxruntime")
@pytest.mark.slow
def test_onnx_export_with_static_shapes_and_of_the_forward():
    model = tiny_model(num_blocks=2, slstm_at=[1])
    _check_generation(export_model(model, "onnx", dynamic=False, batch_size=3, prompt_length=7), model, *_batch())
    from transformers.exporters import OnnxConfig, OnnxExporter

    _check_forward_export(model, OnnxExporter(), OnnxConfig(dynamic=True))


def _onnxruntime_alone(folder: Path, model):
    """The README's example: the saved ONNX programs run by onnxruntime and numpy alone give generate()'s tokens."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("<!-- onnxruntime example -->")[1].split("```python")[1].split("```")[0]
    ids, mask = _batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    namespace = {"folder": str(folder), "input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    exec(code.replace('"my-xlstm-onnx"', "folder"), namespace)
    assert (namespace["tokens"] == ref.numpy()).all()


@needs("executorch")
def test_executorch_export_for_generation_static():
    """ExecuTorch (XNNPACK), static shapes, an mLSTM and an sLSTM block."""
    model = tiny_model(num_blocks=2, slstm_at=[1])
    exported = export_model(model, "executorch", dynamic=False, batch_size=3, prompt_length=7)
    _check_generation(exported, model, *_batch())


@needs("executorch")
@pytest.mark.slow
def test_executorch_export_for_generation_static_large_design(tmp_path):
    model = tiny_model(design="large")
    exported = export_model(model, "executorch", dynamic=False, batch_size=3, prompt_length=7)
    _check_generation(exported, model, *_batch())
    _round_trip(exported, model, tmp_path)


def test_formats_refuse_what_they_cannot_take(monkeypatch):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        check_format("tflite", True)
    if importlib.util.find_spec("executorch") is not None:
        with pytest.raises(ValueError, match="ExecuTorch programs take static shapes only"):
            check_format("executorch", True)
        check_format("executorch", False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match="exporting to onnx needs onnxscript: pip install onnx==1.21.0"):
        check_format("onnx", True)


# --------------------------------------------------------------------------------------------------
# xlstm-hf export
# --------------------------------------------------------------------------------------------------


def test_cli_export_dynamo(tmp_path, capsys):
    """`xlstm-hf export MODEL OUT --format dynamo`: checked against generate(), saved with the tokenizer; the
    saved export loads back and generates."""
    from transformers.exporters import ExportedModel

    from xlstm_hf import cli

    model = tiny_model(design="large")
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer_config.json").write_text("{}")
    assert cli.main(["export", str(tmp_path / "model"), str(tmp_path / "out"), "--format", "dynamo"]) == 0
    out = capsys.readouterr().out
    assert "checked: 8 greedy tokens equal generate()'s on a left-padded batch" in out
    assert "cache.layers.0.recurrent_states.0" in out and "(2, 2, 8, 16)" in out
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    exported = ExportedModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    _check_generation(exported, model, *_batch())


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], None),  # argparse's own usage error
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--prompt-length", "1"], "--prompt-length must be at least 2"),
])
def test_cli_export_bad_arguments_exit_2(tmp_path, capsys, args, message):
    from xlstm_hf import cli

    tiny_model().save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(tmp_path / "model"), str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and (message is None or message in err), err


def test_cli_export_refuses_what_a_format_cannot_take(tmp_path, capsys, monkeypatch):
    from xlstm_hf import cli

    tiny_model().save_pretrained(tmp_path / "model")
    capsys.readouterr()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    for fmt, message in (("onnx", "exporting to onnx needs onnxruntime: pip install onnx==1.21.0 onnxscript==0.7.0 "
                                  "onnxruntime"),
                         ("executorch", "ExecuTorch programs take static shapes only")):
        if fmt == "executorch" and real("executorch") is None:
            continue
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["export", str(tmp_path / "model"), str(tmp_path / "out"), "--format", fmt])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err  # (refused before the model is loaded: one line)
        assert err.startswith(f"xlstm-hf export: error: {message}") and len(err.strip().splitlines()) == 1, err
