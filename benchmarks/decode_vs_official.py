"""Decode speed of a 125M-class xLSTM[7:1] (768 wide, 24 blocks): xlstm_hf vs the official package's step().

Both models get the same random weights (the official model is converted to ours), fp32, batch 1, on
CPU. Prints ms/token for each and the ratio. Usage: python benchmarks/decode_vs_official.py [--tokens N]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

OFFICIAL_CONFIG = {
    "vocab_size": 50304,
    "embedding_dim": 768,
    "num_blocks": 24,
    "context_length": 2048,
    "slstm_at": [4, 12, 20],
    "tie_weights": False,
    "mlstm_block": {"mlstm": {"conv1d_kernel_size": 4, "qkv_proj_blocksize": 4, "num_heads": 4}},
    "slstm_block": {
        "slstm": {"backend": "vanilla", "num_heads": 4, "conv1d_kernel_size": 4, "bias_init": "powerlaw_blockdependent"},
        "feedforward": {"proj_factor": 1.3, "act_fn": "gelu"},
    },
}


def build_official():
    from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                       xLSTMLMModel, xLSTMLMModelConfig)

    c = OFFICIAL_CONFIG
    cfg = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(**c["mlstm_block"]["mlstm"])),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(**c["slstm_block"]["slstm"]),
                                     feedforward=FeedForwardConfig(**c["slstm_block"]["feedforward"])),
        **{k: v for k, v in c.items() if k not in ("mlstm_block", "slstm_block")},
    )
    model = xLSTMLMModel(cfg)
    model.reset_parameters()
    return model.eval()


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
    from transformers import AutoModelForCausalLM

    import xlstm_hf  # noqa: F401
    from xlstm_hf.conversion.official import convert_official_checkpoint

    official = build_official()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "out")
        src.mkdir()
        (src / "config.yaml").write_text(yaml.safe_dump(OFFICIAL_CONFIG))
        torch.save(official.state_dict(), src / "model.pt")
        convert_official_checkpoint(src, out)
        ours = AutoModelForCausalLM.from_pretrained(out).eval()
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
