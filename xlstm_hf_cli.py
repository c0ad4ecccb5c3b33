"""The `xlstm-hf` command line: argument parsing and checking, then the command from `xlstm_hf.cli`.

    xlstm-hf demo [--minutes 3] [--output-dir xlstm-demo]
    xlstm-hf generate --model xlstm-demo --prompt "ROMEO:"
    xlstm-hf train my_texts/ --output-dir xlstm-mine [--model xlstm-demo] [--max-steps 500]
    xlstm-hf convert path/to/checkpoint path/to/out [--dtype bfloat16] [--tokenizer gpt2]
    xlstm-hf convert path/to/xlstm_hf-checkpoint path/to/out --to transformers [--weight-mode fused]

A top-level module, outside the `xlstm_hf` package, because importing anything from the package runs
`xlstm_hf/__init__.py`, which imports torch and transformers (seconds) to register the Auto classes. Here
only the standard library is imported until a command runs, so `--help`, `--version` and every argument
error are immediate: all arguments are checked before `xlstm_hf` (and with it torch) is imported.

Expected failures (a bad argument, a missing folder, a bad checkpoint) print one line to stderr and exit
with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def package_version() -> str:
    """The installed version of xlstm-hf, read from its metadata (no import of the package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xlstm-hf")
    except PackageNotFoundError:
        return "(not installed)"


# --------------------------------------------------------------------------------------------------
# Argument checks (standard library only)
# --------------------------------------------------------------------------------------------------


def _prompt_arg(text: str) -> str:
    """A prompt from the command line, where a typed `\\n` stands for a newline."""
    return text.replace("\\n", "\n")


def _at_least(option: str, value, low) -> None:
    if value is not None and value < low:
        raise ValueError(f"{option} must be at least {low}, got {value:g}")


def _positive(option: str, value, hint: str = "") -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{option} must be positive, got {value:g}{hint}")


def _nonempty_prompt(prompt: str) -> None:
    if not prompt:
        raise ValueError("--prompt is empty; give some text to continue, e.g. --prompt 'ROMEO:'")


def model_folder(model: str) -> str:
    """A local model folder (checked to exist and hold a config.json), or a Hub repo id ("owner/name")
    that is not a local path."""
    path = Path(model).expanduser()
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith("."):
        return model  # left to from_pretrained (needs network, or the local Hub cache)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {model}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a model folder (no config.json)")
    return str(path)


def check_text_paths(paths: list[str]) -> None:
    """Each path is a file or a folder holding .txt files (the messages of `xlstm_hf.train.text_files`, which
    also reads them)."""
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            if not any(p.is_file() for p in path.glob("*.txt")):
                raise FileNotFoundError(f"no .txt files in folder {entry}")
        elif not path.is_file():
            raise FileNotFoundError(f"no such file or folder: {entry}")


def config_overrides(text: str | None) -> dict | None:
    """The --config-overrides JSON object."""
    if not text:
        return None
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config-overrides is not valid JSON ({error})") from None
    if not isinstance(overrides, dict):
        raise ValueError("--config-overrides must be a JSON object, e.g. '{\"dropout\": 0.1}'")
    return overrides


def check_demo(args: argparse.Namespace) -> None:
    _positive("--minutes", args.minutes)
    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _nonempty_prompt(args.prompt)


def check_generate(args: argparse.Namespace) -> None:
    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _nonempty_prompt(args.prompt)
    if not args.greedy:
        _positive("--temperature", args.temperature, " (or use --greedy)")
        _at_least("--top-k", args.top_k, 0)
    args.model = model_folder(args.model)


def check_train(args: argparse.Namespace) -> None:
    _at_least("--max-steps", args.max_steps, 1)
    if args.max_steps is None:
        _positive("--epochs", args.epochs)
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--grad-accum", args.grad_accum, 1)
    _at_least("--block-size", args.block_size, 2)
    if args.pack and args.carry_state:
        raise ValueError("--pack and --carry-state exclude each other (--carry-state keeps documents apart already)")
    _positive("--lr", args.lr)
    _at_least("--warmup-steps", args.warmup_steps, 0)
    _positive("--eval-steps", args.eval_steps)
    _positive("--logging-steps", args.logging_steps)
    _at_least("--save-steps", args.save_steps, 1)
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction:g}")
    args.config_overrides = config_overrides(args.config_overrides)
    check_text_paths(args.data)
    if args.model:
        args.model = model_folder(args.model)
    if Path(args.output_dir).expanduser().is_file():
        raise FileExistsError(f"--output-dir {args.output_dir} is a file, not a folder")
    if args.resume_from_checkpoint and not Path(args.resume_from_checkpoint).expanduser().is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {args.resume_from_checkpoint}")


def check_convert(args: argparse.Namespace) -> None:
    if not Path(args.src).expanduser().is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {args.src}")
    if args.weight_mode is not None and args.to != "transformers":
        raise ValueError("--weight-mode applies to --to transformers only")
    if args.tokenizer != "auto" and args.to == "transformers":
        raise ValueError("--tokenizer applies to conversions into xlstm_hf only")


def check_export(args: argparse.Namespace) -> None:
    model_folder(args.model)
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--prompt-length", args.prompt_length, 2)
    _at_least("--check-tokens", args.check_tokens, 0)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{args.out} exists and is not a folder")


CHECKS = {"demo": check_demo, "generate": check_generate, "train": check_train, "convert": check_convert,
          "export": check_export}


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlstm-hf",
        description="xLSTM (Beck et al. 2024) as a Hugging Face Transformers model: train a demo, generate "
                    "text, train or fine-tune on your text, convert checkpoints (official xlstm, transformers "
                    "xLSTM / xLSTM-7B, xlstm_large) and export them back to transformers, or export models to "
                    "ONNX, ExecuTorch and torch.export.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="train a small xLSTM[7:1] on bundled Shakespeare, save it, reload it and generate",
        description="Train a small xLSTM[7:1] (8 blocks, 256 wide, ~16M parameters) on the bundled Shakespeare "
                    "text for a wall-clock budget, report validation loss/perplexity before and after, save "
                    "model + tokenizer, reload them with the Auto classes and stream a sampled continuation.",
    )
    demo.add_argument("--output-dir", default="xlstm-demo", help="where to save the model (default: %(default)s)")
    demo.add_argument("--minutes", type=float, default=3.0, help="training time budget (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--prompt", type=_prompt_arg, default="HAMLET:\n",
                      help=r"prompt to continue; '\n' is a newline (default: 'HAMLET:\n')")
    demo.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    demo.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    gen = sub.add_parser(
        "generate", help="generate text from a saved model folder, streamed to stdout",
        description="Load a model folder with AutoModelForCausalLM / AutoTokenizer and stream a continuation "
                    "of the prompt (sampling by default, --greedy for greedy decoding).",
    )
    gen.add_argument("--model", required=True, metavar="PATH", help="model folder (as written by save_pretrained)")
    gen.add_argument("--prompt", type=_prompt_arg, default="ROMEO:",
                     help=r"prompt to continue; '\n' is a newline (default: %(default)s)")
    gen.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=40,
                     help="sample from the k most likely tokens; 0: from all (default: %(default)s)")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    tr = sub.add_parser(
        "train", help="train or fine-tune a model on local text files with the Hugging Face Trainer",
        description="Train a model on local text with transformers.Trainer: each file is one document (followed "
                    "by the end-of-text token); all are tokenised, concatenated and cut into blocks of "
                    "--block-size tokens, of which a random --eval-fraction is held out for validation. Reports "
                    "validation loss/perplexity before, during and after training and saves the model and its "
                    "tokenizer to --output-dir. Without --model, a new xLSTM[7:1] like the demo's (8 blocks, 256 "
                    "wide, GPT-2 tokenizer) is trained from scratch.",
    )
    tr.add_argument("data", nargs="+", metavar="DATA", help="text file(s) or folder(s) of *.txt files (UTF-8)")
    tr.add_argument("--output-dir", required=True, metavar="OUT", help="where to save the model and tokenizer")
    tr.add_argument("--model", default=None, metavar="PATH",
                    help="model folder to fine-tune (its tokenizer, else the shipped GPT-2 one) (default: a new model)")
    tr.add_argument("--max-steps", type=int, default=None, metavar="N",
                    help="optimizer steps to train (overrides --epochs)")
    tr.add_argument("--epochs", type=float, default=1.0, metavar="E",
                    help="epochs over the training blocks (default: %(default)s)")
    tr.add_argument("--batch-size", type=int, default=8, metavar="B",
                    help="blocks per forward pass (default: %(default)s)")
    tr.add_argument("--block-size", type=int, default=128, metavar="T", help="tokens per block (default: %(default)s)")
    tr.add_argument("--pack", action="store_true",
                    help="keep documents apart: pack whole files into blocks with exact state resets between them "
                         "(a file longer than a block is cut into block-sized pieces, each trained from a fresh "
                         "state) instead of one concatenated stream")
    tr.add_argument("--carry-state", action="store_true",
                    help="truncated backpropagation through time: each batch row reads its documents in consecutive "
                         "segments of --block-size tokens, starting from the state the previous step ended with "
                         "(cut from the graph), so the model learns from contexts longer than a block")
    tr.add_argument("--lr", type=float, default=1e-3,
                    help="peak learning rate of AdamW, cosine schedule (default: %(default)s)")
    tr.add_argument("--warmup-steps", type=float, default=0.1, metavar="W",
                    help="linear warmup: steps, or a fraction < 1 of the run (default: %(default)s)")
    tr.add_argument("--grad-accum", type=int, default=1, metavar="K",
                    help="micro-batches accumulated per optimizer step (default: %(default)s)")
    tr.add_argument("--bf16", action="store_true", help="bfloat16 autocast (also on CPU); weights stay float32")
    tr.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in backward: less memory, slower")
    tr.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: %(default)s)")
    tr.add_argument("--eval-fraction", type=float, default=0.1, metavar="F",
                    help="fraction of the blocks held out for validation; 0 = none (default: %(default)s)")
    tr.add_argument("--eval-steps", type=float, default=None, metavar="N",
                    help="evaluate every N steps, or a fraction < 1 of the run (default: 0.2, five times)")
    tr.add_argument("--logging-steps", type=float, default=10, metavar="N", help="log the training loss every N steps "
                    "(default: %(default)s)")
    tr.add_argument("--save-steps", type=int, default=None, metavar="N",
                    help="also write resumable checkpoints to OUT/checkpoint-N every N steps")
    tr.add_argument("--resume-from-checkpoint", default=None, metavar="CKPT",
                    help="continue an interrupted run from OUT/checkpoint-N (same options as that run)")
    tr.add_argument("--config-overrides", default=None, metavar="JSON",
                    help="model config fields as a JSON object: for a new model e.g. "
                         "'{\"hidden_size\": 64, \"num_blocks\": 2}', for --model e.g. '{\"dropout\": 0.1}'")

    conv = sub.add_parser(
        "convert", help="convert an xLSTM checkpoint (official xlstm, transformers xLSTM, xlstm_large) into a Hugging "
                        "Face model folder of xlstm_hf, or export one back to transformers",
        description="Convert an xLSTM checkpoint folder into a folder that AutoModelForCausalLM.from_pretrained loads "
                    "after `import xlstm_hf`. The format of SRC is detected: a transformers xLSTM folder (config.json "
                    "with model_type 'xlstm', e.g. NX-AI/xLSTM-7b; safetensors, sharded or not, weight_mode single "
                    "or fused), an NX-AI xlstm_large folder (config.yaml + model.safetensors or model_0.safetensors, "
                    "model_1.safetensors, ...), or an official xlstm checkpoint (config.yaml + model.safetensors or "
                    "one .pt/.pth/.bin file; sLSTM weights of the 'vanilla' or 'cuda' backend). The first two are "
                    "converted shard by shard. With --to transformers, SRC is an xlstm_hf checkpoint of the large "
                    "(xLSTM-7B) design, written back as a transformers xLSTM folder.",
    )
    conv.add_argument("src", metavar="SRC", help="checkpoint folder")
    conv.add_argument("out", metavar="OUT", help="output folder")
    conv.add_argument("--dtype", choices=DTYPES, default=None,
                      help="dtype of the saved weights (default: that of the checkpoint)")
    conv.add_argument("--to", choices=("xlstm_hf", "transformers"), default="xlstm_hf",
                      help="xlstm_hf: convert SRC into an xlstm_hf folder; transformers: export the xlstm_hf "
                           "checkpoint SRC as a transformers xLSTM folder (default: %(default)s)")
    conv.add_argument("--weight-mode", choices=("single", "fused"), default=None,
                      help="with --to transformers: separate q/k/v/gate weights, or fused ones (default: single)")
    conv.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                      help="largest weights file written for xLSTM-7B-style checkpoints, e.g. 5GB or 500MB "
                           "(default: %(default)s)")
    conv.add_argument("--tokenizer", choices=("auto", "gpt2", "none"), default="auto",
                      help="official xlstm checkpoints: auto = the tokenizer files stored with the checkpoint, if "
                           "any (else none, with a warning); gpt2 = GPT-2's tokenizer (ids 50256); none = no "
                           "tokenizer (default: %(default)s)")

    ex = sub.add_parser(
        "export", help="export a model for ONNX Runtime, ExecuTorch or torch.export (prefill and decode programs)",
        description="Export a model folder through transformers' exporters as two programs, prefill (the prompt) "
                    "and decode (one token per row), which take input_ids, attention_mask and the recurrent state "
                    "and return logits and the new state. The export is checked: its greedy tokens for a "
                    "left-padded example batch must equal the model's generate(). OUT then holds the programs, "
                    "export.json, the config and the model's tokenizer; ExportedModel.from_pretrained(OUT) loads "
                    "it after `import xlstm_hf` (dynamo programs with trust_remote_code=True).",
    )
    ex.add_argument("model", metavar="MODEL", help="model folder (as written by save_pretrained)")
    ex.add_argument("out", metavar="OUT", help="output folder")
    ex.add_argument("--format", choices=("onnx", "executorch", "dynamo"), default="onnx",
                    help="onnx (run with onnxruntime), executorch (XNNPACK, .pte) or dynamo (torch.export .pt2) "
                         "(default: %(default)s)")
    ex.add_argument("--static", action="store_true",
                    help="static shapes: the programs take exactly --batch-size rows and a prefill of "
                         "--prompt-length tokens (default: dynamic batch size and length; ExecuTorch needs "
                         "--static)")
    ex.add_argument("--batch-size", type=int, default=2, metavar="B",
                    help="rows of the example batch the programs are traced with (default: %(default)s)")
    ex.add_argument("--prompt-length", type=int, default=8, metavar="T",
                    help="tokens per row of the example batch (default: %(default)s)")
    ex.add_argument("--check-tokens", type=int, default=8, metavar="N",
                    help="greedy tokens compared with generate() after exporting; 0 = no check (default: "
                         "%(default)s)")
    return parser


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _is_expected(error: Exception) -> bool:
    """An error to report in one line: bad input, a missing or unreadable file, an invalid config value."""
    if isinstance(error, (ValueError, OSError)):  # FileNotFoundError is an OSError
        return True
    # huggingface_hub's StrictDataclassError (an invalid config value) is not a ValueError; where its module
    # was never imported, it cannot have been raised either, so it is looked up rather than imported
    errors = sys.modules.get("huggingface_hub.errors")
    return errors is not None and isinstance(error, errors.StrictDataclassError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xlstm-hf` console script. Returns 0; exits with 2 on an expected error."""
    args = build_parser().parse_args(argv)
    try:
        CHECKS[args.command](args)
        commands = importlib.import_module("xlstm_hf.cli")  # torch, transformers and our classes load here
        return getattr(commands, f"cmd_{args.command}")(args)
    except KeyboardInterrupt:
        print(f"xlstm-hf {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if not _is_expected(error):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"xlstm-hf {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
