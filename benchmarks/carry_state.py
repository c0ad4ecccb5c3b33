"""What a carried state buys: perplexity by position on long contexts, trained with and without it.

Two runs of `xlstm_hf.train.train` from the same new model (the demo's xLSTM[7:1], 8 blocks, 256 wide, GPT-2
tokenizer), the same steps, batch, learning rate and seed, on Hamlet and Macbeth from the bundled text:

- blocks:      the usual recipe: the text cut into blocks of --segment tokens, each trained from a fresh state
               (shuffled);
- carry state: `--carry-state` (StatefulTrainer): each of the --batch rows reads its own stretch of the text
               in consecutive segments of --segment tokens, starting from the state the previous step ended
               with (truncated backpropagation through time).

Both models then read The Tempest (held out: not trained on) in windows of --context tokens, each from a fresh
state, and the mean next-token loss is reported by position in the window. A model that has only ever seen
--segment tokens of context has never had to use (or keep in check) a state that is older than that.

    python benchmarks/carry_state.py                 # 300 steps of 8 x 128 tokens per run, ~15 min on 2 cores
    python benchmarks/carry_state.py --quick         # a tiny model, a few steps: checks the script
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

BUCKETS = [(0, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096)]


def plays(text: str) -> dict[str, str]:
    """The bundled file's three plays by name (it holds them one after the other)."""
    macbeth, tempest = text.index("MACBETH\n"), text.index("THE TEMPEST\n")
    return {"hamlet": text[:macbeth], "macbeth": text[macbeth:tempest], "tempest": text[tempest:]}


@torch.no_grad()
def loss_by_position(model, ids: list[int], context: int) -> torch.Tensor:
    """Mean next-token loss at each position 1 .. context-1 of the non-overlapping windows of `ids`: (context - 1,)."""
    model.eval()
    windows = torch.tensor(ids[:len(ids) // context * context]).view(-1, context)
    total = torch.zeros(context - 1)
    for row in windows:
        logits = model(row[None], use_cache=False).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="none")
    return total / len(windows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--segment", type=int, default=128, help="tokens per block / segment (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (default: %(default)s)")
    parser.add_argument("--context", type=int, default=2048, help="evaluation window (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps (checks the script)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for carry_state.md/json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.segment, args.batch, args.context = 4, 32, 2, 256

    from datasets import DatasetDict

    from xlstm_hf.demo import SHAKESPEARE_PATH
    from xlstm_hf.tokenization import load_gpt2_tokenizer
    from xlstm_hf.train import stream_segments, text_dataset, train

    tokenizer = load_gpt2_tokenizer()
    text = plays(SHAKESPEARE_PATH.read_text(encoding="utf-8"))
    overrides = dict(hidden_size=32, num_blocks=2) if args.quick else {}
    held_out = tokenizer(text["tempest"])["input_ids"]
    results, losses = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name in ("hamlet", "macbeth"):
            files.append(Path(tmp) / f"{name}.txt")
            files[-1].write_text(text[name], encoding="utf-8")
        blocks = text_dataset(files, tokenizer, args.segment, eval_fraction=0)
        docs = [tokenizer(text[name])["input_ids"] + [tokenizer.eos_token_id] for name in ("hamlet", "macbeth")]
        share = -(-sum(map(len, docs)) // args.batch)  # the text in `batch` equal stretches, one per row
        stretches = [d[s:s + share] for d in docs for s in range(0, len(d), share)]
        streams = stream_segments(stretches, args.batch, args.segment, pad_token_id=tokenizer.eos_token_id)
        for name, data, carry in (("blocks", blocks, False), ("carry state", DatasetDict(train=streams), True)):
            start = time.perf_counter()
            result = train(data, Path(tmp) / name.replace(" ", "_"), config_overrides=overrides,
                           max_steps=args.steps, batch_size=args.batch, lr=args.lr, carry_state=carry,
                           eval_fraction=0, progress=False, logging_steps=max(1, args.steps // 10), seed=0)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.float32)
            losses[name] = loss_by_position(model, held_out, args.context)
            results[name] = dict(train_loss=result.train_loss, tokens_per_second=result.tokens_per_second,
                                 seconds=time.perf_counter() - start,
                                 buckets={f"{a}-{b}": losses[name][max(a, 1) - 1:b - 1].mean().item()
                                          for a, b in BUCKETS if a < args.context})
            print(f"{name}: {results[name]}", flush=True)

    lines = [
        "# Carried state vs blocks: loss by position on a held-out play (benchmarks/carry_state.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Model: {'a tiny model' if args.quick else 'a new demo xLSTM[7:1] (8 x 256)'}; {args.steps} steps of "
        f"{args.batch} x {args.segment} tokens on Hamlet and Macbeth, AdamW lr {args.lr:g}, cosine; evaluated on The "
        f"Tempest in windows of {args.context} tokens ({len(held_out) // args.context} windows), each from a fresh state.",
        "",
        "| positions | " + " | ".join(f"{name}: loss (ppl)" for name in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for a, b in BUCKETS:
        if a >= args.context:
            continue
        cells = [f"{r['buckets'][f'{a}-{b}']:.3f} ({math.exp(r['buckets'][f'{a}-{b}']):,.0f})" for r in results.values()]
        lines.append(f"| {a}-{b} | " + " | ".join(cells) + " |")
    lines.append("| training loss (last run's average) | " + " | ".join(f"{r['train_loss']:.3f}" for r in results.values()) + " |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if not args.quick or args.out != str(Path(__file__).parent / "results"):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "carry_state.md").write_text(report)
        (out / "carry_state.json").write_text(json.dumps(dict(args=vars(args), results=results,
                                                               loss_by_position={k: v.tolist() for k, v in losses.items()}),
                                                          indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
