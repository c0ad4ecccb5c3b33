"""Padding-free packing against padded batches: real tokens trained per second on realistic mixes of lengths.

Two mixes from the bundled plays (Hamlet, Macbeth, The Tempest), in GPT-2 tokens:
- speeches: the text's blank-line-separated paragraphs (a speech, a stage direction): 3,067 documents, median
  17 tokens, longest 698 (short documents, as in instruction or dialogue data);
- scenes: the text cut at its SCENE / ACT headings (a heading alone joins the next part): 40 documents of
  187 to 21,362 tokens (long documents, cut into pieces of a block).
Every document is cut into pieces of at most --block tokens, the pieces are taken in a fixed random order up
to --tokens tokens, and each way of batching trains on exactly those pieces, once, with the same model and
optimizer (AdamW, fp32):

- padded:    one piece per row, right-padded to the longest piece of the batch (DataCollatorForLanguageModeling's
             padding); --batch rows per step.
- packed:    `xlstm_hf.train.pack_documents` rows of --block tokens (position_ids restart at every piece, the
             model resets its state there); --batch rows per step.
- flattened: transformers' DataCollatorWithFlattening over --batch pieces: one row per step.

Reported: steps, the share of padding, seconds, real (non-padding) tokens per second and the ratio to padded.
A last check that resets cost nothing where there are none: the scenes' tokens as plain blocks of one stream,
trained step by step without and with position_ids that count up (the model finds no document start and
runs exactly the plain path), alternated so that the machine's drift hits both alike. A step is a forward, backward and optimizer step; the first two
steps of every mode are warm-up and not timed (they are trained again, timed, in the same order).

    python benchmarks/packing.py                     # the demo model (xLSTM[7:1], 8 x 256), blocks of 512, ~10 min
    python benchmarks/packing.py --quick             # a tiny model and a few pieces: checks the script
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch


def speeches(text: str, tokenizer) -> list[list[int]]:
    """The text's blank-line-separated paragraphs, tokenised, each followed by eos."""
    return [tokenizer(p)["input_ids"] + [tokenizer.eos_token_id] for p in re.split(r"\n\s*\n", text) if p.strip()]


def scenes(text: str, tokenizer, min_tokens: int = 64) -> list[list[int]]:
    """The text cut at its SCENE / ACT headings, tokenised, each followed by eos; a part shorter than
    `min_tokens` (a heading alone) joins the next."""
    parts = re.split(r"(?m)^(?=(?:SCENE|ACT)\b)", text)
    docs, carry = [], ""
    for part in parts:
        carry += part
        ids = tokenizer(carry)["input_ids"]
        if len(ids) >= min_tokens:
            docs.append(ids + [tokenizer.eos_token_id])
            carry = ""
    if carry.strip():
        docs.append(tokenizer(carry)["input_ids"] + [tokenizer.eos_token_id])
    return docs


def padded_batches(pieces, batch: int, pad_id: int):
    from transformers import DataCollatorForLanguageModeling

    class _Pad:  # the collator needs only a tokenizer's pad(); ours pads right with pad_id
        pad_token_id, padding_side = pad_id, "right"

        def pad(self, features, return_tensors="pt", **_):
            longest = max(len(f["input_ids"]) for f in features)
            ids = [f["input_ids"] + [pad_id] * (longest - len(f["input_ids"])) for f in features]
            mask = [[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"])) for f in features]
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    collator = DataCollatorForLanguageModeling(tokenizer=_Pad(), mlm=False)
    for start in range(0, len(pieces), batch):
        out = collator([{"input_ids": p} for p in pieces[start:start + batch]])
        out["labels"] = out["labels"].masked_fill(out["attention_mask"] == 0, -100)
        yield out


def packed_batches(pieces, batch: int, block: int, pad_id: int):
    from xlstm_hf.train import pack_documents

    rows = pack_documents(pieces, block, pad_id)
    for start in range(0, len(rows), batch):
        yield {k: torch.tensor(v) for k, v in rows[start:start + batch].items()}


def flattened_batches(pieces, batch: int):
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening()
    for start in range(0, len(pieces), batch):
        yield {k: torch.as_tensor(v) for k, v in collator([{"input_ids": p} for p in pieces[start:start + batch]]).items()}


def stream_batches(pieces, batch: int, block: int, with_positions: bool):
    """The pieces' tokens as one stream cut into blocks (no documents): with_positions adds position_ids
    counting up, which start no document."""
    ids = torch.tensor([t for p in pieces for t in p])
    rows = ids[:len(ids) // block * block].view(-1, block)
    for start in range(0, len(rows), batch):
        out = {"input_ids": rows[start:start + batch], "labels": rows[start:start + batch]}
        if with_positions:
            out["position_ids"] = torch.arange(block).expand_as(out["input_ids"])
        yield out


def train_pass(model, batches, warmup: int = 2) -> dict:
    """Train on `batches` (a list) once, timing all but the first `warmup` steps (which are then run again,
    timed, so that every batch is trained on in the timed pass)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b):
        loss = model(**b).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for b in batches[:warmup]:
        step(b)
    start = time.perf_counter()
    losses = [step(b) for b in batches]
    seconds = time.perf_counter() - start
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    return dict(steps=len(batches), seconds=seconds, real_tokens=real, padding=1 - real / total,
                tokens_per_s=real / seconds, mean_loss=sum(losses) / len(losses))


def paired_steps(model, batches, rounds: int = 3) -> dict:
    """Training steps on `batches` without and with position_ids counting up, alternated step by step (the
    order swapped every round), so that drift in the machine's speed hits both alike: the median seconds
    per step of each, and their ratio."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # (no update: every step sees the same weights)
    times = {"without": [], "with": []}

    def step(b):
        start = time.perf_counter()
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(batches[0])  # warm-up
    for r in range(rounds):
        for b in batches:
            plain = {k: v for k, v in b.items() if k != "position_ids"}
            for name in (("without", "with") if r % 2 == 0 else ("with", "without")):
                times[name].append(step(plain if name == "without" else b))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return dict(median_without=median["without"], median_with=median["with"], steps=len(times["with"]),
                ratio=median["with"] / median["without"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=512, help="tokens per row / longest piece (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="rows (pieces) per step (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=32768,
                        help="tokens of pieces trained on per mix, in a fixed random order (default: %(default)s)")
    parser.add_argument("--mixes", default="speeches,scenes", help="subset of speeches,scenes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few pieces (checks the script)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for packing.md/json")
    args = parser.parse_args(argv)

    from xlstm_hf import xLSTMForCausalLM
    from xlstm_hf.demo import SHAKESPEARE_PATH, demo_config
    from xlstm_hf.tokenization import load_gpt2_tokenizer

    tokenizer = load_gpt2_tokenizer()
    text = SHAKESPEARE_PATH.read_text(encoding="utf-8")
    block = 64 if args.quick else args.block
    budget = 1536 if args.quick else args.tokens
    config = demo_config(**(dict(hidden_size=32, num_blocks=2) if args.quick else {}))
    pad = tokenizer.eos_token_id
    model = None
    lines = [
        "# Packing vs padded batches (benchmarks/packing.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Model: {config.layout}, {config.num_blocks} blocks, hidden {config.hidden_size}, "
        f"fp32, AdamW, {args.batch} rows per step, pieces of at most {block} tokens, each trained on once.",
        "",
        "| mix | batching | steps | padding | seconds | real tokens/s | vs padded |",
        "|---|---|---|---|---|---|---|",
    ]
    results = {}
    for mix in args.mixes.split(","):
        docs = {"speeches": speeches, "scenes": scenes}[mix](text, tokenizer)
        pieces = [d[s:s + block] for d in docs for s in range(0, len(d), block)]
        pieces = [p for p in pieces if len(p) >= 2]
        order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(0)).tolist()
        chosen, total = [], 0
        for n in order:
            if total >= budget:
                break
            chosen.append(pieces[n])
            total += len(pieces[n])
        lengths = sorted(len(p) for p in chosen)
        print(f"{mix}: {len(docs)} documents; {len(chosen)} pieces, {total:,} tokens, median {lengths[len(lengths) // 2]}",
              flush=True)
        modes = {
            "padded": list(padded_batches(chosen, args.batch, pad)),
            "packed": list(packed_batches(chosen, args.batch, block, pad)),
            "flattened": list(flattened_batches(chosen, args.batch)),
        }
        if mix == "scenes":  # resets that are not there must cost nothing
            stream = list(stream_batches(chosen, args.batch, block, True))
        for name, batches in modes.items():
            torch.manual_seed(0)
            model = xLSTMForCausalLM(config).train()
            r = results[f"{mix}: {name}"] = train_pass(model, batches, warmup=1 if args.quick else 2)
            print(f"  {name:34s} {r['steps']:4d} steps  padding {r['padding']:6.1%}  {r['seconds']:7.1f} s  "
                  f"{r['tokens_per_s']:8.0f} real tokens/s", flush=True)
            ratio = f"{r['tokens_per_s'] / results[f'{mix}: padded']['tokens_per_s']:.2f}x"
            lines.append(f"| {mix} (median piece {lengths[len(lengths) // 2]}) | {name} | {r['steps']} | {r['padding']:.1%} | "
                         f"{r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} |")
    if "scenes" in args.mixes.split(","):
        torch.manual_seed(0)
        paired = results["no resets: position_ids counting up"] = paired_steps(
            xLSTMForCausalLM(config).train(), stream[:2] if args.quick else stream[:4], rounds=1 if args.quick else 3)
        lines += [
            "",
            f"Resets that are not there cost nothing: {paired['steps']} training steps on blocks of one stream (no "
            "document starts), each run without and with position_ids counting up (which the model checks and finds "
            f"no start in), alternated: median {paired['median_without']:.3f} s vs {paired['median_with']:.3f} s per "
            f"step, ratio {paired['ratio']:.3f}.",
        ]
        print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    out = Path(args.out)
    if not args.quick or args.out != str(Path(__file__).parent / "results"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "packing.md").write_text(report)
        (out / "packing.json").write_text(json.dumps(dict(args=vars(args), results=results), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
