"""Exporting an xLSTM for on-device and server runtimes, through transformers' own exporters.

`export_model` runs `transformers.exporters`' `export_for_generation` for ONNX (run with onnxruntime), ExecuTorch
(XNNPACK) or a torch.export program: two programs, `prefill` (the prompt, from the empty state) and `decode` (one
token per row, from the state). Their inputs are `input_ids` (B, T), `attention_mask` (B, T) of 1 for real
tokens and 0 for (left) padding, and the recurrent state; their outputs are `logits` (B, T, V) and the new
state. The state is the `xLSTMCache`'s tensors, float32, batch first (see `state_names`):

    cache.layers.{j}.conv_states.0         (B, F, K-1)   block j's conv window, time last (no conv: absent)
    cache.layers.{j}.recurrent_states.{i}  mLSTM block: C (B, NH, DK, DV), n (B, NH, DK), m (B, NH) for i = 0, 1, 2
                                           sLSTM block: h, c, n, m (B, NH, DH) for i = 0, 1, 2, 3
    cache.seen                             ()            positions consumed (int64)

ONNX names a decode step's inputs `input.cache...` and its outputs `output.cache...` (the prefill's outputs
`cache...`): each step feeds every state output back as the input of the same name. The prefill's empty
state has no tensors. `generate_exported` runs that loop (greedy).

What each format takes:
- dynamic shapes (the default): any batch size and prompt length. The mLSTM then runs as one chunk
  (`cells.mlstm_one_chunk`, memory quadratic in the prompt length) and the sLSTM as a `scan` over time.
- static shapes: the example's batch size and prompt length only (pad prompts to it, on the left).
- ExecuTorch (XNNPACK) takes static shapes only: its passes lose the sLSTM scan's symbolic length, and an
  mLSTM-only program exported with dynamic shapes fails at run time on any other shape than the traced one
  (`aten::full.out` cannot resize its output in the memory plan).
"""

import importlib.util

import torch

#: format -> (exporter class, config class, the packages it needs, the pip install that provides them)
FORMATS = {
    "onnx": ("OnnxExporter", "OnnxConfig", ("onnx", "onnxscript", "onnxruntime"),
             "onnx==1.21.0 onnxscript==0.7.0 onnxruntime"),
    "executorch": ("ExecutorchExporter", "ExecutorchConfig", ("executorch",), "executorch"),
    "dynamo": ("DynamoExporter", "DynamoConfig", (), ""),
}


def check_format(format: str, dynamic: bool) -> None:
    """Raise for a format this installation cannot export to, or with these shapes, naming what is missing."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: choose one of {sorted(FORMATS)}")
    _, _, packages, pip = FORMATS[format]
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"exporting to {format} needs {', '.join(missing)}: pip install {pip}")
    if format == "executorch" and dynamic:
        raise ValueError("ExecuTorch programs take static shapes only (with dynamic ones, its passes lose the sLSTM "
                         "scan's symbolic length, and the programs fail at run time on other shapes than traced): "
                         "export with static shapes (dynamic=False, --static), or to onnx or dynamo")


def example_inputs(config, batch_size: int = 2, prompt_length: int = 8, seed: int = 0) -> dict:
    """A left-padded batch of random prompts (the first row shorter by two tokens, where the batch has two rows):
    the inputs an export is traced with and checked on."""
    if batch_size < 1 or prompt_length < 2:
        raise ValueError(f"the example batch needs batch_size >= 1 and prompt_length >= 2, got {batch_size}, "
                         f"{prompt_length}")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, prompt_length), generator=generator)
    attention_mask = torch.ones(batch_size, prompt_length, dtype=torch.long)
    if batch_size > 1:
        attention_mask[0, :2] = 0
        input_ids[0, :2] = config.pad_token_id if config.pad_token_id is not None else 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def export_model(model, format: str = "onnx", dynamic: bool = True, batch_size: int = 2, prompt_length: int = 8):
    """The model's prefill and decode programs in `format` ("onnx", "executorch" or "dynamo"), traced on
    `example_inputs(batch_size, prompt_length)`: a transformers `ExportedModel` (`save_pretrained` writes it;
    `ExportedModel.from_pretrained` reads it back where xlstm_hf is imported, which registers the cache)."""
    import transformers.exporters as exporters

    check_format(format, dynamic)
    exporter, config_class, _, _ = FORMATS[format]
    model.eval()
    inputs = example_inputs(model.config, batch_size, prompt_length)
    return getattr(exporters, exporter)().export_for_generation(
        model, inputs, getattr(exporters, config_class)(dynamic=dynamic))


def state_names(cache) -> dict[str, tuple]:
    """{name: shape} of an `xLSTMCache`'s state tensors, named as the exported programs name them (ONNX: a
    decode step's inputs with "input." before the name, its outputs with "output.")."""
    from transformers.exporters.utils import get_leaf_tensors

    return {f"cache.{name}": tuple(tensor.shape) for name, tensor in get_leaf_tensors(cache).items()}


@torch.no_grad()
def generate_exported(exported, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      max_new_tokens: int = 20):
    """Greedy decoding through an export's runners: the prefill on the prompt (left padded where the rows
    differ in length), then one decode step per token, each fed the state the step before returned.
    Returns (tokens (B, max_new_tokens), [logits (B, V) of each step, float32])."""
    from .modeling_xlstm import xLSTMCache

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prefill, decode = exported.runners["prefill"], exported.runners["decode"]
    traced = prefill.metadata.kwargs["input_ids"]["shape"]
    if not prefill.metadata.export_config.get("dynamic", False) and list(input_ids.shape) != traced:
        raise ValueError(f"this export has static shapes: its prefill takes input_ids of shape {tuple(traced)}, got "
                         f"{tuple(input_ids.shape)} (pad the prompts on the left to that length, or export with "
                         "dynamic shapes)")
    out = prefill(input_ids=input_ids, attention_mask=attention_mask, cache=xLSTMCache(exported.config))
    logits = [out["logits"][:, -1].float()]
    step_mask = torch.ones(input_ids.shape[0], 1, dtype=attention_mask.dtype)  # (the state holds the rest)
    for _ in range(max_new_tokens - 1):
        token = logits[-1].argmax(-1, keepdim=True)
        out = decode(input_ids=token, attention_mask=step_mask, cache=out["cache"])
        logits.append(out["logits"][:, -1].float())
    return torch.stack([step.argmax(-1) for step in logits], 1), logits


__all__ = ["FORMATS", "check_format", "example_inputs", "export_model", "generate_exported", "state_names"]
