"""Decode speed of the exported ONNX program in onnxruntime against PyTorch, eager and compiled, on this CPU.

One model, fp32, random weights (speed does not depend on them): by default the demo's xLSTM[7:1] (8 blocks,
256 wide, 16.2M parameters, GPT-2 vocabulary) and an xLSTM[11:1] of 12 blocks, 768 wide (81.8M parameters). For each
batch size, every runtime prefills the same left-padded prompts of --prompt tokens and then decodes --tokens
tokens greedily, feeding each step its previous token:

- eager:        `model(token, cache=cache)` with `config.compile_inference=False`;
- compiled:     the same calls with `compile_inference=True` (the model's own compiled decode step,
                `backends.decode_call`; compiled before timing);
- onnxruntime:  the `decode.onnx` program of `xlstm_hf.export.export_model(model, "onnx")` in an
                `onnxruntime.InferenceSession` with numpy inputs (as `README.md`'s example runs it), with as
                many intra-op threads as torch uses.

Reported: milliseconds per decode step (the median over --repeats runs of --tokens steps, the runtimes
alternated so that the machine's drift hits all alike), tokens/s, the ratio to eager, and whether the three
produced the same greedy tokens (they must).

    python benchmarks/export_decode.py              # both models, batch 1 and 8, ~5 min (the ONNX exports)
    python benchmarks/export_decode.py --quick      # a tiny model: checks the script
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlstm_hf import xLSTMConfig, xLSTMForCausalLM  # noqa: E402
from xlstm_hf.demo import demo_config  # noqa: E402
from xlstm_hf.export import export_model  # noqa: E402

MODELS = {
    "demo (8 x 256)": lambda: demo_config(),
    "xLSTM[11:1] 12 x 768": lambda: demo_config(hidden_size=768, num_blocks=12, slstm_at=[3]),
    "tiny (4 x 32)": lambda: xLSTMConfig(vocab_size=97, hidden_size=32, num_blocks=4, slstm_at=[1],
                                         mlstm_num_heads=2, slstm_num_heads=2, chunk_size=8, pad_token_id=0),
}


def prompts(config, batch: int, length: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[0, : length // 4] = 0  # (left padding, as generate() batches prompts)
    return ids, mask


def torch_decoder(model, ids, mask, steps: int):
    """A function running `steps` decode steps from the prompt's state: (seconds, tokens)."""
    @torch.no_grad()
    def run():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, token, tokens = out.cache, out.logits[:, -1:].argmax(-1), []
        start = time.perf_counter()
        for _ in range(steps):
            tokens.append(token)
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start, torch.cat(tokens, 1).numpy()
    return run


def onnx_decoder(folder: Path, ids, mask, steps: int, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    prefill = ort.InferenceSession(str(folder / "prefill.onnx"), options, providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(folder / "decode.onnx"), options, providers=["CPUExecutionProvider"])
    names = {session: [o.name for o in session.get_outputs()][1:] for session in (prefill, decode)}
    ones = np.ones((ids.shape[0], 1), dtype=np.int64)

    def run():
        outputs = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        session, token, tokens = prefill, outputs[0][:, -1:].argmax(-1), []
        start = time.perf_counter()
        for _ in range(steps):
            tokens.append(token)
            state = {"input." + n.removeprefix("output."): v for n, v in zip(names[session], outputs[1:])}
            outputs, session = decode.run(None, {"input_ids": token, "attention_mask": ones, **state}), decode
            token = outputs[0][:, -1:].argmax(-1)
        return time.perf_counter() - start, np.concatenate(tokens, 1)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps: checks the script")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per runtime (default: %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="folder for export_decode.md/json")
    args = parser.parse_args(argv)
    models = ["tiny (4 x 32)"] if args.quick else ["demo (8 x 256)", "xLSTM[11:1] 12 x 768"]
    if args.quick:
        args.batch, args.prompt, args.tokens, args.repeats = [2], 8, 4, 2
    threads = torch.get_num_threads()
    import onnxruntime

    lines = [
        "# Decode speed: the exported ONNX program in onnxruntime vs PyTorch eager and compiled",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {threads} threads, torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, fp32. Prompt {args.prompt} tokens (left "
        f"padded), then {args.tokens} greedy decode steps; the median of {args.repeats} alternated runs. "
        "`python benchmarks/export_decode.py`",
        "",
        "| model | batch | runtime | ms / step | tokens/s | vs eager | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    results, notes = [], []
    for name in models:
        torch.manual_seed(0)
        model = xLSTMForCausalLM(MODELS[name]()).eval()
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            export_model(model, "onnx").save_pretrained(folder)
            export_seconds = time.perf_counter() - start
            for batch in args.batch:
                ids, mask = prompts(model.config, batch, args.prompt)
                runs = {}
                for runtime, compiled in (("eager", False), ("compiled", True)):
                    model.config.compile_inference = compiled
                    runs[runtime] = torch_decoder(model, ids, mask, args.tokens)
                model.config.compile_inference = False
                runs["onnxruntime"] = onnx_decoder(Path(folder), ids, mask, args.tokens, threads)
                times, tokens = {r: [] for r in runs}, {}
                for r, run in runs.items():  # warm-up: compiles, allocates
                    tokens[r] = run()[1]
                for _ in range(args.repeats):
                    for r, run in runs.items():
                        model.config.compile_inference = r == "compiled"
                        seconds, tokens[r] = run()
                        times[r].append(seconds / args.tokens)
                model.config.compile_inference = False
                for r in runs:
                    ms = statistics.median(times[r]) * 1e3
                    eager = statistics.median(times["eager"]) * 1e3
                    same = bool((tokens[r] == tokens["eager"]).all())
                    results.append(dict(model=name, batch=batch, runtime=r, ms_per_step=ms, tokens_per_s=batch / ms * 1e3,
                                        vs_eager=eager / ms, same_tokens=same, all_ms=[t * 1e3 for t in times[r]],
                                        export_seconds=export_seconds))
                    lines.append(f"| {name} | {batch} | {r} | {ms:.2f} | {batch / ms * 1e3:,.0f} | {eager / ms:.2f}x | "
                                 f"{'yes' if same else 'NO'} |")
                    print(lines[-1], flush=True)
        notes.append(f"- {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; the ONNX export "
                     f"(prefill and decode) took {export_seconds:.0f} s.")
    report = "\n".join(lines + [""] + notes) + "\n"
    print(report)
    if not args.quick or args.out != str(Path(__file__).parent / "results"):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "export_decode.md").write_text(report)
        (out / "export_decode.json").write_text(json.dumps(dict(args=vars(args), results=results), indent=2))
    return 0 if all(r["same_tokens"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
