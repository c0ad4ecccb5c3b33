"""Measurements of the CPU suite beyond decode / prefill / training of the 125M peers (`cpu_suite.py`
runs each in a worker of its own, `--what small|lossmem|compile`):

- `small`: forward + backward of the small models of the paper's synthetic tasks, for xlstm_hf, the
  official package and GPT-2 at the same width and depth (`SMALL_MODELS`);
- `lossmem`: peak RSS of one forward with `labels` over 20,000 tokens of the demo model (the fused linear +
  cross-entropy never holds the (T, V) fp32 logits);
- `compile`: the demo model's training step (forward, backward, fused AdamW) eager vs `torch.compile`d the
  way `TrainingArguments(torch_compile=True)` compiles it: the compile time, the steady step time and the
  number of graphs compiled across repeated steps and two more sequence lengths (recompiles).

Each function returns a list of result records (the fields of `cpu_suite.Worker.record` without the peer).
torch is imported inside them: `cpu_suite`'s parent process reads `SMALL_MODELS` without it.
"""

from __future__ import annotations

import time

#: name -> (blocks, width, layout, batch, T); layout: "m" = mLSTM only, "s" = sLSTM only, "ms" = alternating
#: (xLSTM[1:1]: sLSTM at blocks 1, 3, ...). 4 heads everywhere; vocabulary 256 (the synthetic tasks' scale).
SMALL_MODELS = {
    "mlstm_2x128": (2, 128, "m", 64, 64),
    "slstm_2x64": (2, 64, "s", 64, 40),
    "mixed_4x256": (4, 256, "ms", 8, 128),
}
SMALL_VOCAB = 256
SMALL_HEADS = 4
LOSSMEM_TOKENS = 20_000


def _best_of(fn, reps: int, budget_s: float) -> tuple[float, int]:
    fn()  # warm-up (lazy initialisation, allocator)
    times = []
    while len(times) < reps and sum(times) < budget_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), len(times)


def slstm_blocks(blocks: int, layout: str) -> list[int]:
    return {"m": [], "s": list(range(blocks)), "ms": list(range(1, blocks, 2))}[layout]


def build_small(peer: str, name: str):
    """The small model `name` for `peer` (random weights, official init where the peer has one)."""
    blocks, width, layout, _, T = SMALL_MODELS[name]
    at = slstm_blocks(blocks, layout)
    if peer == "xlstm_hf":
        import xlstm_hf

        return xlstm_hf.xLSTMForCausalLM(xlstm_hf.xLSTMConfig(
            vocab_size=SMALL_VOCAB, hidden_size=width, num_blocks=blocks, slstm_at=at, mlstm_num_heads=SMALL_HEADS,
            slstm_num_heads=SMALL_HEADS, tie_word_embeddings=False))
    if peer == "official":
        from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                           xLSTMLMModel, xLSTMLMModelConfig)

        cfg = xLSTMLMModelConfig(
            vocab_size=SMALL_VOCAB, embedding_dim=width, num_blocks=blocks, context_length=T, slstm_at=at,
            tie_weights=False,
            mlstm_block=None if layout == "s" else mLSTMBlockConfig(mlstm=mLSTMLayerConfig(
                conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=SMALL_HEADS)),
            slstm_block=None if layout == "m" else sLSTMBlockConfig(
                slstm=sLSTMLayerConfig(backend="vanilla", num_heads=SMALL_HEADS, conv1d_kernel_size=4,
                                       bias_init="powerlaw_blockdependent"),
                feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu")))
        model = xLSTMLMModel(cfg)
        model.reset_parameters()
        return model
    if peer == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        # one GPT-2 layer (attention + MLP) per xLSTM block
        return GPT2LMHeadModel(GPT2Config(vocab_size=SMALL_VOCAB, n_positions=max(T, 64), n_embd=width,
                                          n_layer=blocks, n_head=SMALL_HEADS, tie_word_embeddings=False))
    raise ValueError(f"no small models for peer {peer!r}")


def small_loss(peer: str, model, ids):
    import torch

    if peer == "official":
        logits = model(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def measure_small(peer: str, reps: int = 5, budget_s: float = 20.0) -> list[dict]:
    """Per small model: best seconds of forward + backward (no optimizer), fp32."""
    import torch

    out = []
    for index, name in enumerate(SMALL_MODELS):
        blocks, width, layout, B, T = SMALL_MODELS[name]
        torch.manual_seed(0)
        model = build_small(peer, name).train()
        ids = torch.randint(0, SMALL_VOCAB, (B, T))

        def step():
            model.zero_grad(set_to_none=True)
            small_loss(peer, model, ids).backward()

        seconds, n = _best_of(step, reps, budget_s)
        out.append({"what": "small", "batch": B, "size": index, "status": "ok", "value": 1000 * seconds,
                    "unit": "ms", "seconds": seconds, "reps": n, "label": name, "T": T,
                    "parameters": sum(p.numel() for p in model.parameters())})
    return out


def measure_lossmem(peak_rss) -> list[dict]:
    """Peak RSS of the process after one no-grad forward with `labels` and `skip_logits=True` over
    LOSSMEM_TOKENS tokens of the demo model (evaluating a long document's loss; training with labels takes
    the same fused path), and what the (T, V) fp32 logits alone would take. `peak_rss()`: the process's peak
    RSS in bytes or None (cpu_suite.peak_rss_bytes)."""
    import torch

    from xlstm_hf import xLSTMForCausalLM
    from xlstm_hf.demo import demo_config

    torch.manual_seed(0)
    model = xLSTMForCausalLM(demo_config()).eval()
    ids = torch.randint(0, 50257, (1, LOSSMEM_TOKENS))
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, labels=ids, use_cache=False, skip_logits=True)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    return [{"what": "lossmem", "batch": 1, "size": LOSSMEM_TOKENS, "status": "ok" if peak else "skip",
             "reason": None if peak else "n/a: no peak-RSS source", "value": (peak or 0) / 2**30, "unit": "GiB",
             "seconds": seconds, "full_logits_gib": LOSSMEM_TOKENS * model.config.vocab_size * 4 / 2**30}]


def measure_compile(B: int = 8, T: int = 256, steps: int = 5) -> list[dict]:
    """The demo model's training step eager and compiled (torch.compile(model), as Trainer does with
    torch_compile=True): compile time (first step minus a steady one), best steady step, and the graphs
    compiled over `steps` steps at T, then at T + 8 (Dynamo recompiles once with dynamic shapes) and at
    T + 16 (which must reuse the dynamic graphs: no recompile per length or per call)."""
    import torch

    import torch._dynamo.utils as dynamo_utils

    from xlstm_hf import xLSTMForCausalLM
    from xlstm_hf.demo import demo_config

    torch.manual_seed(0)
    model = xLSTMForCausalLM(demo_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(m, ids):
        start = time.perf_counter()
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    ids = torch.randint(0, 50257, (B, T))
    eager = min(step(model, ids) for _ in range(steps))
    compiled = torch.compile(model)
    dynamo_utils.counters.clear()
    times = [step(compiled, ids) for _ in range(steps)]
    graphs = [dynamo_utils.counters["stats"]["unique_graphs"]]
    for extra in (8, 16):
        step(compiled, torch.randint(0, 50257, (B, T + extra)))
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    breaks = sum(dynamo_utils.counters["graph_break"].values())
    best = min(times[1:])
    return [{"what": "compile", "batch": B, "size": T, "status": "ok", "value": B * T / best, "unit": "tok/s",
             "seconds": best, "eager_seconds": eager, "eager_tok_s": B * T / eager,
             "compile_seconds": times[0] - best, "graphs": graphs, "graph_breaks": breaks, "steps": steps}]
