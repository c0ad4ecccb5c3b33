"""The `xlstm-hf` command: `demo`, `generate`, `train` and `convert`.

    xlstm-hf demo [--minutes 3] [--output-dir xlstm-demo]
    xlstm-hf generate --model xlstm-demo --prompt "ROMEO:"
    xlstm-hf train my_texts/ --output-dir xlstm-mine [--model xlstm-demo] [--max-steps 500]
    xlstm-hf convert path/to/checkpoint path/to/out [--dtype bfloat16]
    xlstm-hf convert path/to/xlstm_hf-checkpoint path/to/out --to transformers [--weight-mode fused]

Expected failures (a missing folder, a bad checkpoint) print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def _prompt_arg(text: str) -> str:
    """A prompt from the command line, where a typed `\\n` stands for a newline."""
    return text.replace("\\n", "\n")


def _model_folder(model: str) -> str:
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


def _load_tokenizer(model: str):
    """The folder's tokenizer, or the shipped GPT-2 tokenizer when the folder has none."""
    from transformers import AutoTokenizer

    path = Path(model)
    if path.is_dir() and not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from .tokenization import load_gpt2_tokenizer

        print(f"note: {model} has no tokenizer files; using the shipped GPT-2 tokenizer", file=sys.stderr)
        return load_gpt2_tokenizer()
    return AutoTokenizer.from_pretrained(model)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    run_demo(args.output_dir, minutes=args.minutes, seed=args.seed, device=args.device, prompt=args.prompt,
             max_new_tokens=args.max_new_tokens)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from .demo import generate_text, resolve_device

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.greedy and (args.temperature <= 0 or args.top_k < 0):
        raise ValueError("--temperature must be > 0 and --top-k >= 0 (or use --greedy)")
    model_path = _model_folder(args.model)
    device = resolve_device(args.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32 if device.type == "cpu" else "auto")
    except OSError as error:
        if Path(model_path).is_dir():
            raise
        raise OSError(f"{model_path} is not a local folder, and loading it from the Hub failed: "
                      f"{str(error).strip().splitlines()[0]}") from error
    model = model.to(device).eval()
    tokenizer = _load_tokenizer(model_path)
    generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                  temperature=args.temperature, top_k=args.top_k, seed=args.seed, stream=True)
    return 0


def _config_overrides(text: str | None) -> dict | None:
    """The --config-overrides JSON object."""
    import json

    if not text:
        return None
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config-overrides is not valid JSON ({error})") from None
    if not isinstance(overrides, dict):
        raise ValueError("--config-overrides must be a JSON object, e.g. '{\"dropout\": 0.1}'")
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from .train import format_perplexity, text_files, train

    overrides = _config_overrides(args.config_overrides)
    text_files(args.data)  # report a missing file before loading anything
    model = _model_folder(args.model) if args.model else None
    result = train(
        args.data, args.output_dir, model=model, config_overrides=overrides, block_size=args.block_size,
        eval_fraction=args.eval_fraction, max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, eval_steps=args.eval_steps,
        logging_steps=args.logging_steps, save_steps=args.save_steps,
        resume_from_checkpoint=args.resume_from_checkpoint,
    )
    print("summary:")
    print(f"  model       {result.model_description}, {result.num_params / 1e6:.1f}M parameters")
    print(f"  data        {result.train_blocks:,} training / {result.eval_blocks:,} validation blocks of "
          f"{result.block_size} tokens")
    print(f"  training    {result.steps} steps ({result.epochs:.2f} epochs) in {result.train_seconds:.0f} s, "
          f"training loss {result.train_loss:.3f}")
    if result.eval_loss_after is not None:
        if result.eval_loss_before is not None:
            print(f"  validation  loss {result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f}, perplexity "
                  f"{format_perplexity(result.eval_loss_before)} -> {format_perplexity(result.eval_loss_after)}")
        else:
            print(f"  validation  loss {result.eval_loss_after:.3f}, "
                  f"perplexity {format_perplexity(result.eval_loss_after)}")
    print(f"  saved to    {Path(result.output_dir).resolve()}")
    print(f"  try         xlstm-hf generate --model {result.output_dir} --prompt 'ROMEO:'")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    src = Path(args.src)
    if not src.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {args.src}")
    try:
        from xlstm_hf.conversion import large, official
    except ImportError as error:
        raise OSError(f"checkpoint conversion is not available in this installation ({error})") from error
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.to == "transformers":
        out = large.export_to_transformers(src, args.out, weight_mode=args.weight_mode or "single", dtype=dtype,
                                           max_shard_size=args.max_shard_size, progress=print)
        print(f"exported {src} -> {out}; load it with transformers' AutoModelForCausalLM.from_pretrained "
              f"(model_type 'xlstm')")
        return 0
    if args.weight_mode is not None:
        raise ValueError("--weight-mode applies to --to transformers only")
    fmt = large.detect_format(src, strict=False)  # None: neither config.json nor config.yaml
    if fmt in (None, "official"):
        try:
            out = official.convert_official_checkpoint(src, args.out, dtype, progress=print)
        except ValueError as error:
            # tried as an official checkpoint for lack of a config file: say everything that was looked for
            if fmt is None and str(error).startswith("no config.yaml"):
                raise ValueError(large.unknown_format_message(src)) from error
            raise
        fmt = fmt or "official"
    else:
        out = large.convert_checkpoint(src, args.out, dtype, max_shard_size=args.max_shard_size, progress=print)
    print(f"converted {src} ({fmt} checkpoint) -> {out or args.out}; load it with AutoModelForCausalLM.from_pretrained "
          f"after `import xlstm_hf`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlstm-hf",
        description="xLSTM (Beck et al. 2024) as a Hugging Face Transformers model: train a demo, generate "
                    "text, train or fine-tune on your text, convert checkpoints (official xlstm, transformers "
                    "xLSTM / xLSTM-7B, xlstm_large) and export them back to transformers.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    demo.set_defaults(func=cmd_demo)

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
    gen.add_argument("--top-k", type=int, default=40, help="sample from the k most likely tokens (default: %(default)s)")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    gen.set_defaults(func=cmd_generate)

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
    tr.set_defaults(func=cmd_train)

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
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xlstm-hf` console script. Returns 0; exits with 2 on an expected error."""
    from huggingface_hub.errors import StrictDataclassError  # an invalid config value

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, StrictDataclassError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"xlstm-hf {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"xlstm-hf {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
