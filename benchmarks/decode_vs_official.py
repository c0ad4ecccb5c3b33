"""Decode speed of a 125M-class xLSTM[7:1] (768 wide, 24 blocks): xlstm_hf vs the official package's step().

Both models get the same random weights (the official model is converted to ours), fp32, batch 1, on
CPU. Prints ms/token for each and the ratio. Usage: python benchmarks/decode_vs_official.py [--tokens N]

A quick two-model check; `cpu_suite.py` measures this and much more (contexts up to 8k, batch 8, bf16,
prefill, training, bounds), with the same model builders (`_peers.py`).
"""

import argparse
import statistics
import time

import torch

from _peers import build_official, official_to_ours


def time_decode(step, prompt_len: int, tokens: int) -> float:
    """Median ms per decoded token; `step(t)` advances by one token."""
    for t in range(prompt_len):
        step(t)
    times = []
    for t in range(prompt_len, prompt_len + tokens):
        start = time.perf_counter()
        step(t)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    import xlstm_hf

    official = build_official(context_length=max(2048, args.prompt + args.tokens))
    ours = official_to_ours(official)
    ids = torch.randint(0, 50257, (1, args.prompt + args.tokens))
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")

    with torch.inference_mode():
        state = {}

        def official_step(t):
            nonlocal state
            _, state = official.step(ids[:, t : t + 1], state=state)

        cache = xlstm_hf.xLSTMCache(ours.config)

        def ours_step(t):
            ours(ids[:, t : t + 1], past_key_values=cache, use_cache=True)

        ms_official = time_decode(official_step, args.prompt, args.tokens)
        ms_ours = time_decode(ours_step, args.prompt, args.tokens)
    print(f"official xlstm step(): {ms_official:7.1f} ms/token")
    print(f"xlstm_hf (cache):      {ms_ours:7.1f} ms/token")
    print(f"speed-up:              {ms_official / ms_ours:7.2f}x")


if __name__ == "__main__":
    main()
