"""GPU check: the Triton kernels' correctness at real shapes, their speed against bounds and peers, and a full
training step against GPT-2. One command, under 10 minutes on one H100/H200; writes a JSON and a markdown table.

    python benchmarks/gpu_check.py                    # on a CUDA machine: benchmarks/results/gpu_check.{json,md}
    python benchmarks/gpu_check.py --out DIR --skip-training
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # CPU, tiny shapes (run in CI)

What it measures (the head dims of the shipped designs: the paper's 125M model, mLSTM 4 x 384 and sLSTM
4 x 192; the paper's 1.3B model, mLSTM 4 x 1024 and sLSTM 4 x 512; xLSTM-7B, mLSTM 8 heads of DK 256 / DV 512):
1. correctness: every kernel (mLSTM chunkwise forward + backward, mLSTM decode step, sLSTM forward + backward)
   in bf16 (tensor-core products) and in fp32 (exact products) against the PyTorch reference in fp32 on the
   same inputs: outputs, final states and every gradient, error relative to the largest entry. Pass: bf16
   < 2e-2 (bf16 has 8 bits: 3.9e-3 per rounding), fp32 < 1e-4. The exit status is 1 if any check fails.
   Also generate() compiled through transformers' compile path (CUDA graphs) against eager generate(): the
   same greedy tokens, logits within 1e-4, one compiled graph for the decode step.
2. kernel speed: forward and forward + backward times, with the FLOP and byte bounds from peaks measured in the
   same run (a large bf16 matmul, a large copy); the PyTorch reference, transformers' native mLSTM path
   (mlstm_kernels' chunkwise--native_autograd, what transformers' xLSTM runs) and TFLA
   (chunkwise--triton_xl_chunk) when importable. The sLSTM is sequential: its figure is microseconds per step,
   against the estimate in kernels/README.md.
3. training: one AdamW step (bf16 autocast, fp32 weights) in tokens/s for the paper's 125M model, a 125M-scale
   model of the xLSTM-7B design, transformers' xLSTM at the same scale, and GPT-2 124M (HF, SDPA attention).

Timings are medians over repeats after warm-up (which includes Triton's autotuning); nothing is asserted
about them.
"""

import argparse
import gc
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

# head dims of the shipped designs
MLSTM_SHAPES = {"paper 125M": (4, 384, 384), "paper 1.3B": (4, 1024, 1024), "xLSTM-7B": (8, 256, 512)}
SLSTM_SHAPES = {"paper 125M": (4, 192), "paper 1.3B": (4, 512), "12 x 64 (flashrnn's setting)": (12, 64)}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}
# FlashRNN's published figure (github.com/NX-AI/flashrnn, README "Speed comparison", head_dim--lstm.svg): an
# LSTM, B = 16, T = 1024, bf16, total hidden 768; fused CUDA kernel, forward ms by (heads x head dim)
FLASHRNN_LSTM_FWD_MS = {"12 x 64": 3.1, "6 x 128": 3.22, "3 x 256": 3.62, "1 x 768": 4.87}
# TFLA's published figure (arXiv 2503.14376): mLSTM chunkwise with xLSTM-7B's heads, 65k tokens, H100, bf16
TFLA_PUBLISHED = "forward 6.4 ms, forward+backward 15.3 ms"


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after warm-up (2 runs; 1 when repeats is 1: the dry run)."""
    for _ in range(2 if repeats > 1 else 1):
        fn()
    times = []
    while len(times) < repeats:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def rel_err(got, ref) -> float:
    got, ref = got.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")
    got, ref = got[finite], ref[finite]
    if ref.numel() == 0:
        return 0.0
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def measure_peaks(device, dry_run: bool) -> dict:
    """Achievable bf16 matmul FLOP/s and memory bandwidth, measured now (the bounds' denominators)."""
    n, numel = (256, 1 << 20) if dry_run else (8192, 1 << 28)
    dtype = torch.float32 if dry_run else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t_mm = timed(lambda: a @ b, device, repeats=5 if dry_run else 20)
    x = torch.empty(numel, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    t_copy = timed(lambda: y.copy_(x), device, repeats=5 if dry_run else 20)
    return {"matmul_tflops": 2 * n**3 / t_mm / 1e12, "bandwidth_gbs": 2 * x.nbytes / t_copy / 1e9}


def bound_seconds(flops: float, nbytes: float, peaks: dict) -> float:
    return max(flops / (peaks["matmul_tflops"] * 1e12), nbytes / (peaks["bandwidth_gbs"] * 1e9))


# ------------------------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------------------------


def mlstm_inputs(B, NH, T, DK, DV, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = rand(B, NH, T, DK), rand(B, NH, T, DK), rand(B, NH, T, DV)
    i, f = rand(B, NH, T), rand(B, NH, T) + 3.0  # forget gates mostly open, as after the usual init
    state = (rand(B, NH, DK, DV) * 0.1, rand(B, NH, DK).abs() * 0.1, rand(B, NH))
    return [t.to(device) for t in (q, k, v, i, f)], [t.to(device) for t in state]


def check_mlstm_chunkwise(B, NH, T, DK, DV, dtype, device, chunk, packed=False):
    from xlstm_hf import cells
    from xlstm_hf.kernels.mlstm_chunkwise import mlstm_chunkwise_triton

    inputs, state = mlstm_inputs(B, NH, T, DK, DV, device)
    resets = None
    if packed:  # packed documents: starts at t = 0 of row 0 (dropping its state), at a chunk boundary, inside chunks
        resets = torch.zeros(B, T, dtype=torch.bool)
        resets[0, 0] = True
        resets[:, [chunk, chunk + 1, T // 3, T - 1]] = True
        resets = resets.to(device)
    inputs = [x.to(dtype).float() for x in inputs]  # the same values for kernel and reference
    g = torch.Generator().manual_seed(1)
    w_h = torch.randn(B, NH, T, DV, generator=g).to(device)
    results = []
    for fn, in_dtype in ((mlstm_chunkwise_triton, dtype), (cells.mlstm_chunkwise, torch.float32)):
        xs = [x.to(in_dtype).requires_grad_() for x in inputs]
        s0 = [s.clone().requires_grad_() for s in state]
        h, (C, n, m) = fn(*xs, initial_state=s0, output_final_state=True, chunk_size=chunk, resets=resets)
        loss = (h.float() * w_h).sum() + C.sum() + n.sum()
        grads = torch.autograd.grad(loss, xs + s0[:2])
        results.append([h, C, n, m, *grads])
    names = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0"]
    return {name: rel_err(a, b) for name, a, b in zip(names, *results)}


def check_mlstm_step(B, NH, DK, DV, dtype, device):
    from xlstm_hf import cells
    from xlstm_hf.kernels.mlstm_step import mlstm_step_triton

    inputs, state = mlstm_inputs(B, NH, 1, DK, DV, device, seed=2)
    q, k, v, i, f = (x[:, :, 0].to(dtype) for x in inputs)
    with torch.no_grad():
        h, (C, n, m) = mlstm_step_triton(q, k, v, i, f, [s.clone() for s in state])
        ref_h, (ref_C, ref_n, ref_m) = cells.mlstm_step(*(x.float() for x in (q, k, v, i, f)), state)
    return {"h": rel_err(h, ref_h), "C": rel_err(C, ref_C), "n": rel_err(n, ref_n), "m": rel_err(m, ref_m)}


def check_slstm(B, T, NH, DH, dtype, device):
    from xlstm_hf import cells
    from xlstm_hf.kernels.slstm import slstm_recurrent_triton

    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, NH, 4, DH, generator=g).to(device, dtype).float()
    R = (torch.randn(NH, DH, 4, DH, generator=g) / DH**0.5).to(device, dtype).float()
    b = torch.randn(NH, 4, DH, generator=g).to(device, dtype).float()
    w = torch.randn(B, T, NH, DH, generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[0, : T // 4] = False  # a left-padded row
    results = []
    for fn, in_dtype in ((slstm_recurrent_triton, dtype), (cells.slstm_recurrent, torch.float32)):
        leaves = [t.to(in_dtype).requires_grad_() for t in (x, R, b)]
        out, (h, c, n, m) = fn(*leaves, output_final_state=True, mask=mask)
        loss = (out.float() * w).sum() + h.sum() + c.sum()
        results.append([out, h, c, n, *torch.autograd.grad(loss, leaves)])
    names = ["out", "h_T", "c_T", "n_T", "dx", "dR", "db"]
    return {name: rel_err(a, b) for name, a, b in zip(names, *results)}


def check_compiled_generate(device, dry_run):
    """generate() compiled through transformers' path (`CompileConfig()`: mode "reduce-overhead", CUDA graphs on
    CUDA) against eager generate(), the demo model in fp32, a left-padded batch: the share of greedy tokens that
    differ, the logits' error, and the Dynamo graphs beyond one (the decode step must compile once). The dry run
    uses a small model and Dynamo's "eager" backend on CPU."""
    import torch._dynamo
    from transformers import CompileConfig

    from xlstm_hf import xLSTMForCausalLM
    from xlstm_hf.demo import demo_config

    torch.manual_seed(0)
    config = demo_config(vocab_size=512, hidden_size=64, num_blocks=2, slstm_at=[1]) if dry_run else demo_config()
    model = xLSTMForCausalLM(config).to(device).eval()
    ids = torch.randint(1, config.vocab_size, (4, 16), device=device)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8 if dry_run else 32, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    ref = model.generate(ids, **kwargs)
    compile_config = CompileConfig(backend="eager", mode="default") if dry_run else CompileConfig()
    compile_config._compile_all_devices = True if dry_run else None
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(2):  # (the second call replays what the first compiled)
        out = model.generate(ids, compile_config=compile_config, **kwargs)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return {"tokens differing": (out.sequences != ref.sequences).float().mean().item(),
            "logits": max(rel_err(a, b) for a, b in zip(out.logits, ref.logits)),
            "graphs beyond one": float(graphs - 1)}


def correctness(device, half, dry_run):
    rows = []
    mlstm = {"tiny": (1, 16, 32), "tiny, 2 x 3 tiles": (1, 96, 160)} if dry_run else MLSTM_SHAPES
    slstm = {"tiny": (1, 16), "tiny, tiled": (1, 96)} if dry_run else SLSTM_SHAPES
    B, T, chunk = (1, 40, 16) if dry_run else (2, 512, 64)
    for dtype in (half, torch.float32):
        for design, (NH, DK, DV) in mlstm.items():
            rows.append(("mLSTM chunkwise", design, f"B={B} T={T} NH={NH} DK={DK} DV={DV} chunk={chunk}", dtype,
                         check_mlstm_chunkwise(B, NH, T, DK, DV, dtype, device, chunk)))
            rows.append(("mLSTM step", design, f"B=4 NH={NH} DK={DK} DV={DV}", dtype,
                         check_mlstm_step(4, NH, DK, DV, dtype, device)))
        NH, DK, DV = next(iter(mlstm.values()))
        rows.append(("mLSTM packed", next(iter(mlstm)), f"B={B} T={T} NH={NH} DK={DK} DV={DV}, document starts", dtype,
                     check_mlstm_chunkwise(B, NH, T, DK, DV, dtype, device, chunk, packed=True)))
        for design, (NH, DH) in slstm.items():
            Bs, Ts = (2, 4) if dry_run else (4, 128)
            rows.append(("sLSTM", design, f"B={Bs} T={Ts} NH={NH} DH={DH}, padded row", dtype,
                         check_slstm(Bs, Ts, NH, DH, dtype, device)))
    rows.append(("generate compiled", "demo model", "B=4, 16 + 32 tokens, CompileConfig() (CUDA graphs)",
                 torch.float32, check_compiled_generate(device, dry_run)))
    out = []
    for kernel, design, shape, dtype, errors in rows:
        worst = max(errors, key=errors.get)
        ok = errors[worst] < TOLERANCE[dtype]
        out.append({"kernel": kernel, "design": design, "shape": shape, "dtype": str(dtype).split(".")[-1],
                    "max_rel_err": errors[worst], "worst": worst, "errors": errors, "pass": ok})
        print(f"  {'PASS' if ok else 'FAIL'} {kernel:<16} {design:<14} {out[-1]['dtype']:<9} max {errors[worst]:.2e} "
              f"({worst})", flush=True)
    return out


# ------------------------------------------------------------------------------------------------------------
# 2. kernel speed
# ------------------------------------------------------------------------------------------------------------


def mlstm_peers(dry_run):
    from xlstm_hf import cells
    from xlstm_hf.kernels.mlstm_chunkwise import mlstm_chunkwise_triton

    peers = {"xlstm_hf triton": mlstm_chunkwise_triton, "xlstm_hf torch (reference)": cells.mlstm_chunkwise}
    for label, name in (("transformers native (mlstm_kernels native_autograd)", "chunkwise--native_autograd"),
                        ("TFLA (mlstm_kernels triton_xl_chunk)", "chunkwise--triton_xl_chunk")):
        if dry_run and "triton" in name:
            continue  # their Triton kernels are not meant for the interpreter
        try:
            from mlstm_kernels.torch import get_mlstm_kernel

            theirs = get_mlstm_kernel(name)
            if "triton" in name:  # TFLA with its own default chunk (128, its design point), kernels in the input dtype
                peers[label] = lambda q, k, v, i, f, chunk_size=64, _fn=theirs: (
                    _fn(q, k, v, i, f, autocast_kernel_dtype=q.dtype),)
            else:
                peers[label] = lambda q, k, v, i, f, chunk_size=64, _fn=theirs: (
                    _fn(q, k, v, i, f, chunk_size=chunk_size),)
        except Exception as error:  # noqa: BLE001 - not importable here: leave it out, say why
            print(f"  ({label} not available: {type(error).__name__}: {str(error)[:100]})")
    return peers


def speed_mlstm(device, peaks, dtype, dry_run, repeats):
    shapes = {"tiny": (1, 1, 64, 16, 16)} if dry_run else {
        "paper 125M": (16, 4, 2048, 384, 384), "paper 1.3B": (8, 4, 2048, 1024, 1024),
        "xLSTM-7B": (16, 8, 4096, 256, 512)}  # 65k tokens, as TFLA's published figure
    L = 16 if dry_run else 64
    rows = []
    for design, (B, NH, T, DK, DV) in shapes.items():
        NC = T // L
        # forward: intra-chunk q k^T and S v (causal half counted whole), state read q C and update k^T v
        fwd_flops = 2 * B * NH * T * (L * (DK + DV) + 2 * DK * DV)
        elem = torch.finfo(dtype).bits // 8
        io = B * NH * T * (2 * DK + 2 * DV + 2) * elem  # q, k, v, i, f in, h out
        states = B * NH * (NC + 1) * DK * DV * 4  # the fp32 boundary states, written once
        fwd_bytes = io + states
        for label, fn in mlstm_peers(dry_run).items():
            g = torch.Generator().manual_seed(0)
            xs = [torch.randn(B, NH, T, d, generator=g).to(device, dtype).requires_grad_() for d in (DK, DK, DV)]
            gates = [(torch.randn(B, NH, T, generator=g) + 3.0 * j).to(device, dtype).requires_grad_() for j in (0, 1)]
            args = (*xs, *gates)
            try:
                with torch.no_grad():
                    t_fwd = timed(lambda: fn(*args, chunk_size=L), device, repeats)

                def fwd_bwd():
                    fn(*args, chunk_size=L)[0].float().sum().backward()

                t_fb = timed(fwd_bwd, device, repeats)
            except Exception as error:  # noqa: BLE001
                print(f"  {label}: failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                continue
            b_fwd = bound_seconds(fwd_flops, fwd_bytes, peaks)
            b_fb = bound_seconds(3 * fwd_flops, 3 * fwd_bytes, peaks)  # the backward: ~2x the forward's work
            rows.append({"kernel": "mLSTM chunkwise", "design": design, "impl": label,
                         "shape": f"B={B} NH={NH} T={T} DK={DK} DV={DV} L={L}",
                         "fwd_ms": 1e3 * t_fwd, "fwd_bound_ms": 1e3 * b_fwd, "fwd_bwd_ms": 1e3 * t_fb,
                         "fwd_bwd_bound_ms": 1e3 * b_fb, "fwd_tflops": fwd_flops / t_fwd / 1e12})
            print(f"  mLSTM {design:<11} {label:<52} fwd {1e3 * t_fwd:8.2f} ms ({t_fwd / b_fwd:5.1f}x bound)  "
                  f"fwd+bwd {1e3 * t_fb:8.2f} ms ({t_fb / b_fb:5.1f}x bound)", flush=True)
    return rows


def speed_mlstm_step(device, peaks, dtype, dry_run, repeats):
    from xlstm_hf import cells
    from xlstm_hf.kernels.mlstm_step import mlstm_step_triton

    rows = []
    shapes = {"tiny": (4, 1, 16, 16)} if dry_run else {"paper 125M": (16, 4, 384, 384), "xLSTM-7B": (16, 8, 256, 512)}
    for design, (B, NH, DK, DV) in shapes.items():
        q, k = (torch.randn(B, NH, DK, device=device, dtype=dtype) for _ in range(2))
        v = torch.randn(B, NH, DV, device=device, dtype=dtype)
        i, f = (torch.randn(B, NH, device=device, dtype=dtype) for _ in range(2))
        state = (torch.zeros(B, NH, DK, DV, device=device), torch.zeros(B, NH, DK, device=device),
                 torch.zeros(B, NH, device=device))
        nbytes = 2 * state[0].nbytes  # C read and written once
        for label, fn in (("xlstm_hf triton", mlstm_step_triton), ("xlstm_hf torch (reference)", cells.mlstm_step)):
            with torch.no_grad():
                t = timed(lambda: fn(q, k, v, i, f, state), device, repeats)
            b = bound_seconds(0, nbytes, peaks)
            rows.append({"kernel": "mLSTM step", "design": design, "impl": label, "shape": f"B={B} NH={NH} DK={DK} DV={DV}",
                         "fwd_ms": 1e3 * t, "fwd_bound_ms": 1e3 * b})
            print(f"  mLSTM step {design:<11} {label:<28} {1e3 * t:8.3f} ms ({t / b:5.1f}x bound)", flush=True)
    return rows


def speed_slstm(device, dtype, dry_run, repeats):
    from xlstm_hf.kernels.slstm import slstm_recurrent_triton
    from xlstm_hf.slstm_autograd import slstm_recurrent_bptt

    rows = []
    shapes = {"tiny": (2, 8, 1, 16), "tiny, tiled": (2, 8, 1, 96)} if dry_run else {
        name: (16, 1024, NH, DH) for name, (NH, DH) in SLSTM_SHAPES.items()}
    for design, (B, T, NH, DH) in shapes.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, T, NH, 4, DH, generator=g).to(device, dtype).requires_grad_()
        R = (torch.randn(NH, DH, 4, DH, generator=g) / DH**0.5).to(device, dtype).requires_grad_()
        b = torch.zeros(NH, 4, DH, device=device, dtype=dtype, requires_grad=True)
        peers = {"xlstm_hf triton": slstm_recurrent_triton, "xlstm_hf torch backend": slstm_recurrent_bptt}
        for label, fn in peers.items():
            with torch.no_grad():
                t_fwd = timed(lambda: fn(x, R, b), device, repeats if "triton" in label else 1)
            t_fb = timed(lambda: fn(x, R, b)[0].float().sum().backward(), device, repeats if "triton" in label else 1)
            # the bound of a sequential kernel is per step: kernels/README.md's estimate (an H100's ~110 GB/s from
            # L2 into one SM for R's 4 DH^2 values above 64, else the ~1.5 us latency of one step's chain)
            step = max(1.5e-6, 4 * DH * DH * x.element_size() / 110e9) if DH > 64 else 1.5e-6
            rows.append({"kernel": "sLSTM", "design": design, "impl": label, "shape": f"B={B} T={T} NH={NH} DH={DH}",
                         "fwd_ms": 1e3 * t_fwd, "fwd_bound_ms": 1e3 * T * step, "fwd_bwd_ms": 1e3 * t_fb,
                         "fwd_bwd_bound_ms": 2e3 * T * step, "fwd_us_per_step": 1e6 * t_fwd / T,
                         "fwd_bwd_us_per_step": 1e6 * t_fb / T})
            print(f"  sLSTM {design:<30} {label:<24} fwd {1e3 * t_fwd:8.2f} ms ({1e6 * t_fwd / T:6.2f} us/step)  "
                  f"fwd+bwd {1e3 * t_fb:8.2f} ms ({1e6 * t_fb / T:6.2f} us/step)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------
# 3. training step
# ------------------------------------------------------------------------------------------------------------


def training_models(dry_run):
    """name -> builder of a model on CPU (fp32 weights)."""
    import xlstm_hf

    def ours_paper():
        if dry_run:
            return xlstm_hf.xLSTMForCausalLM(xlstm_hf.xLSTMConfig(
                vocab_size=256, hidden_size=64, num_blocks=2, slstm_at=[1], mlstm_num_heads=2, slstm_num_heads=2,
                kernel_backend="triton", chunk_size=16))
        return xlstm_hf.xLSTMForCausalLM(xlstm_hf.xLSTMConfig())

    def ours_large():
        size = dict(hidden_size=64, num_blocks=2, mlstm_num_heads=2, vocab_size=256, kernel_backend="triton",
                    chunk_size=16) if dry_run else dict(hidden_size=768, num_blocks=12, mlstm_num_heads=4)
        return xlstm_hf.xLSTMForCausalLM(xlstm_hf.xLSTMConfig.from_preset("xlstm-7b", **size))

    def hf_xlstm(kernel):
        def build():
            from transformers import xLSTMConfig, xLSTMForCausalLM

            size = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=2, chunk_size=16, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0) if dry_run else dict(
                vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_heads=4)
            return xLSTMForCausalLM(xLSTMConfig(**size, mode="train", chunkwise_kernel=kernel,
                                                sequence_kernel="native_sequence__native", step_kernel="native",
                                                tie_word_embeddings=False, autocast_kernel_dtype="bfloat16"))
        return build

    def gpt2():
        from transformers import GPT2Config, GPT2LMHeadModel

        size = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                    eos_token_id=0) if dry_run else {}
        return GPT2LMHeadModel(GPT2Config(**size, attn_implementation="sdpa"))

    models = {"xlstm_hf paper 125M (xLSTM[7:1])": ours_paper,
              "xlstm_hf 7B design at 125M scale": ours_large,
              "transformers xLSTM 125M scale (native kernels)": hf_xlstm("chunkwise--native_autograd")}
    if not dry_run:
        models["transformers xLSTM 125M scale (TFLA kernels)"] = hf_xlstm("chunkwise--triton_xl_chunk")
    models["GPT-2 124M (transformers, sdpa)"] = gpt2
    return models


def training(device, dry_run, repeats):
    B, T = (2, 32) if dry_run else (16, 1024)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    rows = []
    for name, build in training_models(dry_run).items():
        try:
            model = build().to(device).train()
            vocab = model.config.vocab_size
            params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
            embed = model.get_input_embeddings().weight.numel()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def step():
                with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t = timed(step, device, repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        except Exception as error:  # noqa: BLE001
            print(f"  {name}: failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            rows.append({"model": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            continue
        finally:
            model = opt = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # 6 N per token for the weight matmuls (the input embedding is a lookup, not a matmul)
        rows.append({"model": name, "batch": B, "length": T, "params": params, "step_s": t,
                     "tokens_per_s": B * T / t, "matmul_tflops": 6 * (params - embed) * B * T / t / 1e12,
                     "peak_gib": peak})
        print(f"  {name:<48} {B * T / t:10.0f} tok/s  step {1e3 * t:8.1f} ms  peak {peak:6.1f} GiB", flush=True)
    gpt2 = next((r["tokens_per_s"] for r in rows if r["model"].startswith("GPT-2") and "tokens_per_s" in r), None)
    for r in rows:
        if gpt2 and "tokens_per_s" in r:
            r["x_gpt2"] = r["tokens_per_s"] / gpt2
    return rows


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    env, peaks = report["environment"], report["peaks"]
    lines = [f"# GPU check: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; "
             f"{env['date']}; total {report['seconds']:.0f} s.",
             f"Measured peaks (the bounds): bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s, "
             f"copy bandwidth {peaks['bandwidth_gbs']:.0f} GB/s.", "",
             "## Correctness (kernel vs the fp32 PyTorch reference; error relative to the largest entry)", "",
             "| kernel | design | shape | dtype | max error | worst | pass |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["correctness"]:
        lines.append(f"| {r['kernel']} | {r['design']} | {r['shape']} | {r['dtype']} | {r['max_rel_err']:.2e} | "
                     f"{r['worst']} | {'yes' if r['pass'] else '**NO**'} |")
    lines += ["", "## Kernel speed (median ms; bound = max(FLOPs / peak, bytes / bandwidth); sLSTM: T x the per-step "
              "estimate of kernels/README.md)", "",
              "| kernel | design | implementation | shape | fwd ms | fwd bound ms | x bound | fwd+bwd ms | "
              "fwd+bwd bound ms | x bound | us/step fwd | us/step fwd+bwd |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda r, k, f="{:.2f}": f.format(r[k]) if k in r else ""  # noqa: E731
    ratio = lambda r, a, b: f"{r[a] / r[b]:.1f}" if a in r and b in r and r[b] > 0 else ""  # noqa: E731
    for r in report["kernels"]:
        lines.append(f"| {r['kernel']} | {r['design']} | {r['impl']} | {r['shape']} | {fmt(r, 'fwd_ms', '{:.3f}')} | "
                     f"{fmt(r, 'fwd_bound_ms', '{:.3f}')} | {ratio(r, 'fwd_ms', 'fwd_bound_ms')} | {fmt(r, 'fwd_bwd_ms')} | "
                     f"{fmt(r, 'fwd_bwd_bound_ms')} | {ratio(r, 'fwd_bwd_ms', 'fwd_bwd_bound_ms')} | "
                     f"{fmt(r, 'fwd_us_per_step')} | {fmt(r, 'fwd_bwd_us_per_step')} |")
    lines += ["", "FlashRNN's published LSTM forward (fused CUDA kernel, B=16, T=1024, bf16; H100 per its benchmark data): "
              + ", ".join(f"{k}: {v} ms" for k, v in FLASHRNN_LSTM_FWD_MS.items()) + ".",
              f"TFLA's published mLSTM chunkwise at xLSTM-7B heads, 65k tokens (H100, bf16): {TFLA_PUBLISHED} "
              "(mlstm_kernels' Triton kernels use tl.make_block_ptr, which Triton 3.9 removed: they may fail here).", "",
              "## Training step (AdamW, bf16 autocast, fp32 weights)", "",
              "| model | params | batch x length | tokens/s | x GPT-2 | step ms | 6N TFLOP/s | peak GiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["training"]:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['batch']} x {r['length']} | "
                     f"{r['tokens_per_s']:.0f} | {r.get('x_gpt2', float('nan')):.2f} | {1e3 * r['step_s']:.1f} | "
                     f"{r['matmul_tflops']:.1f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON and markdown")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (CI)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    start = time.time()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        device, half, repeats = torch.device("cpu"), torch.float16, 1  # bf16 is wrong in the interpreter
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy on the kernels' masked-off lanes
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this check is for GPUs (--dry-run with TRITON_INTERPRET=1 checks the script)")
        device, half, repeats = torch.device("cuda"), torch.bfloat16, args.repeats
    import transformers
    import triton

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU interpreter ({platform.processor()})",
           "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run}
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}", flush=True)
    report = {"environment": env, "peaks": measure_peaks(device, args.dry_run)}
    print(f"peaks: {report['peaks']}\n1. correctness", flush=True)
    report["correctness"] = correctness(device, half, args.dry_run)
    print(f"2. kernel speed ({time.time() - start:.0f} s)", flush=True)
    report["kernels"] = (speed_mlstm(device, report["peaks"], half, args.dry_run, repeats)
                         + speed_mlstm_step(device, report["peaks"], half, args.dry_run, repeats)
                         + speed_slstm(device, half, args.dry_run, repeats))
    print(f"3. training ({time.time() - start:.0f} s)", flush=True)
    report["training"] = [] if args.skip_training else training(device, args.dry_run, repeats)
    report["seconds"] = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown(report))
    failed = [r for r in report["correctness"] if not r["pass"]]
    print(f"wrote {out / stem}.json and .md in {report['seconds']:.0f} s; "
          f"{len(failed)} of {len(report['correctness'])} correctness checks failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
