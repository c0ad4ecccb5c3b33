"""The commands of `xlstm-hf`: `demo`, `generate`, `train`, `convert` and `export`.

The console script's entry point is the top-level module `xlstm_hf_cli`: it parses and checks the
arguments with the standard library alone, then imports this module (and with it torch, transformers and
the Auto-class registration of `xlstm_hf`) to run a command. `main` and `build_parser` are re-exported here,
so `python -m xlstm_hf.cli` and `xlstm_hf.cli.main([...])` work as before.

Expected failures (a missing folder, a bad checkpoint) print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xlstm_hf_cli import DTYPES, build_parser, main  # noqa: F401  (re-exported)


def _load_tokenizer(model: str):
    """The folder's tokenizer, or the shipped GPT-2 tokenizer when the folder has none."""
    from transformers import AutoTokenizer

    path = Path(model)
    if path.is_dir() and not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from .tokenization import load_gpt2_tokenizer

        print(f"note: {model} has no tokenizer files; using the shipped GPT-2 tokenizer", file=sys.stderr)
        return load_gpt2_tokenizer()
    return AutoTokenizer.from_pretrained(model)


def unreadable_weights(*folders) -> str | None:
    """The first `*.safetensors` file in `folders` that safetensors cannot open (truncated or corrupt)."""
    from safetensors import safe_open

    for folder in folders:
        for path in sorted(Path(folder).glob("*.safetensors")) if folder and Path(folder).is_dir() else []:
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except Exception:
                return str(path)
    return None


def weights_error(error: Exception, *folders) -> OSError:
    """A one-line OSError for a SafetensorError raised while loading from `folders`, naming the bad file."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    file = unreadable_weights(*folders) or " or ".join(str(folder) for folder in folders if folder)
    return OSError(f"cannot read the weights in {file}: the file is truncated or corrupt (safetensors: {reason}); "
                   f"save or download the model again")


def load_model(model: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(model, **kwargs)`, with loading failures as one-line OSErrors."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except SafetensorError as error:
        raise weights_error(error, model) from error
    except OSError as error:
        if Path(model).is_dir():
            raise
        raise OSError(f"{model} is not a local folder, and loading it from the Hub failed: "
                      f"{str(error).strip().splitlines()[0]}") from error


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, minutes=args.minutes, seed=args.seed, device=args.device, prompt=args.prompt,
             max_new_tokens=args.max_new_tokens)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .demo import generate_text, resolve_device

    device = resolve_device(args.device)
    model = load_model(args.model, dtype=torch.float32 if device.type == "cpu" else "auto")
    model = model.to(device).eval()
    tokenizer = _load_tokenizer(args.model)
    generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                  temperature=args.temperature, top_k=args.top_k, seed=args.seed, stream=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from .train import format_perplexity, train

    try:
        result = train(
            args.data, args.output_dir, model=args.model, config_overrides=args.config_overrides,
            block_size=args.block_size, packing=args.pack, carry_state=args.carry_state,
            eval_fraction=args.eval_fraction, max_steps=args.max_steps, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
            bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
            eval_steps=args.eval_steps, logging_steps=args.logging_steps, save_steps=args.save_steps,
            resume_from_checkpoint=args.resume_from_checkpoint,
        )
    except SafetensorError as error:  # a truncated --model or checkpoint
        raise weights_error(error, args.model, args.resume_from_checkpoint) from error
    print("summary:")
    print(f"  model       {result.model_description}, {result.num_params / 1e6:.1f}M parameters")
    kind = "segments of carried streams" if args.carry_state else "rows of packed documents" if args.pack else "blocks"
    print(f"  data        {result.train_blocks:,} training {kind} / {result.eval_blocks:,} validation rows of "
          f"{result.block_size} tokens")
    print(f"  training    {result.steps} steps ({result.epochs:.2f} epochs) in {result.train_seconds:.0f} s, "
          f"{result.tokens_per_second:,.0f} real tokens/s, training loss {result.train_loss:.3f}")
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
    try:
        from xlstm_hf.conversion import large, official
    except ImportError as error:
        raise OSError(f"checkpoint conversion is not available in this installation ({error})") from error
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tokenizer = None if args.tokenizer == "none" else args.tokenizer
    if args.to == "transformers":
        out = large.export_to_transformers(src, args.out, weight_mode=args.weight_mode or "single", dtype=dtype,
                                           max_shard_size=args.max_shard_size, progress=print)
        print(f"exported {src} -> {out}; load it with transformers' AutoModelForCausalLM.from_pretrained "
              f"(model_type 'xlstm')")
        return 0
    fmt = large.detect_format(src, strict=False)  # None: neither config.json nor config.yaml
    if fmt in (None, "official"):
        try:
            out = official.convert_official_checkpoint(src, args.out, dtype, progress=print, tokenizer=tokenizer)
        except ValueError as error:
            # tried as an official checkpoint for lack of a config file: say everything that was looked for
            if fmt is None and str(error).startswith("no config.yaml"):
                raise ValueError(large.unknown_format_message(src)) from error
            raise
        fmt = fmt or "official"
    else:
        out = large.convert_checkpoint(src, args.out, dtype, max_shard_size=args.max_shard_size, progress=print,
                                   tokenizer=tokenizer)
    print(f"converted {src} ({fmt} checkpoint) -> {out or args.out}; load it with AutoModelForCausalLM.from_pretrained "
          f"after `import xlstm_hf`")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from .export import check_format, example_inputs, export_model, generate_exported, state_names

    try:
        check_format(args.format, not args.static)  # (before loading the model and the long export)
    except ImportError as error:  # a missing exporter package: one line, naming the pip install
        raise OSError(str(error)) from error
    model = load_model(args.model, dtype=torch.float32)
    print(f"exporting {args.model} to {args.format} ({'static' if args.static else 'dynamic'} shapes), traced on "
          f"{args.batch_size} x {args.prompt_length} tokens ...")
    exported = export_model(model, args.format, dynamic=not args.static, batch_size=args.batch_size,
                            prompt_length=args.prompt_length)
    if args.check_tokens:
        inputs = example_inputs(model.config, args.batch_size, args.prompt_length, seed=1)
        tokens, logits = generate_exported(exported, inputs["input_ids"], inputs["attention_mask"], args.check_tokens)
        ref = model.generate(**inputs, max_new_tokens=args.check_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        if not torch.equal(tokens, ref.sequences[:, args.prompt_length:]):
            raise ValueError(f"the exported programs' greedy tokens differ from generate()'s: {tokens.tolist()} vs "
                             f"{ref.sequences[:, args.prompt_length:].tolist()}")
        worst = max((a - b).abs().max().item() for a, b in zip(logits, ref.logits))
        print(f"checked: {args.check_tokens} greedy tokens equal generate()'s on a left-padded batch; logits within "
              f"{worst:.1e}")
    exported.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (Path(args.model) / name).is_file():
            shutil.copy(Path(args.model) / name, Path(args.out) / name)
    with torch.no_grad():
        cache = model(**example_inputs(model.config, args.batch_size, args.prompt_length), use_cache=True).cache
    print(f"the decode step's state (for a batch of {args.batch_size}):")
    for name, shape in state_names(cache).items():
        print(f"  {name:44s} {tuple(shape)}")
    print(f"saved to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
