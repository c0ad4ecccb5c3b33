"""GPU benchmark of the fused cell kernels: forward and forward+backward time and TFLOP/s at several
sequence lengths, for our Triton kernels, our PyTorch reference, and NX-AI's mlstm_kernels (mLSTM) /
flashrnn (sLSTM) when they are importable. Prints every figure and its ratio to ours.

    python benchmarks/kernels_gpu.py                     # on a CUDA machine, bf16 inputs
    python benchmarks/kernels_gpu.py --dtype float32 --lengths 1024 4096
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --dry-run   # checks the script on CPU, tiny shapes

Not run in CI (it needs a GPU; timings are never asserted anywhere).
"""

import argparse
import os
import time

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def mlstm_flops(B, NH, T, DK, DV, L):
    """Forward FLOPs of the chunkwise mLSTM: intra-chunk q k^T and S v, plus state read (q C) and update."""
    return 2 * B * NH * T * (L * (DK + DV) + 2 * DK * DV)


def slstm_flops(B, NH, T, DH):
    """Forward FLOPs of the sLSTM: the four recurrent matmuls per step (pointwise work not counted)."""
    return 2 * B * NH * T * DH * 4 * DH


def timed(fn, repeats: int, device) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def mlstm_candidates():
    from xlstm_hf import cells
    from xlstm_hf.kernels.mlstm_chunkwise import mlstm_chunkwise_triton

    out = {"xlstm_hf triton": mlstm_chunkwise_triton, "xlstm_hf torch": cells.mlstm_chunkwise}
    try:  # NX-AI's kernels, for comparison (their signature differs: wrap it)
        from mlstm_kernels.torch import get_mlstm_kernel

        theirs = get_mlstm_kernel("chunkwise--triton_xl_chunk")
        out["mlstm_kernels xl_chunk"] = lambda q, k, v, i, f, chunk_size=64, **_: (
            theirs(q, k, v, i, f, chunk_size=chunk_size), None)
    except Exception as error:  # noqa: BLE001 - any failure just means "not available here"
        print(f"(mlstm_kernels not available: {type(error).__name__}: {error})")
    return out


def slstm_candidates():
    from xlstm_hf import cells
    from xlstm_hf.kernels.slstm import slstm_recurrent_triton

    out = {"xlstm_hf triton": slstm_recurrent_triton, "xlstm_hf torch": cells.slstm_recurrent}
    try:
        import flashrnn  # noqa: F401

        print("(flashrnn is importable; its API differs by version, compare by hand with the same shapes)")
    except Exception:  # noqa: BLE001
        print("(flashrnn not available)")
    return out


def bench(name, candidates, make_inputs, flops, repeats, device):
    print(f"\n{name}")
    print(f"{'implementation':<26}{'fwd ms':>10}{'fwd TFLOP/s':>13}{'fwd+bwd ms':>13}{'x ours (fwd+bwd)':>18}")
    ours = None
    for label, fn in candidates.items():
        inputs = make_inputs()
        try:
            with torch.no_grad():
                t_fwd = timed(lambda: fn(*inputs), repeats, device)

            def fwd_bwd():
                out = fn(*inputs)[0]
                out.float().sum().backward()

            t_fb = timed(fwd_bwd, repeats, device)
        except Exception as error:  # noqa: BLE001
            print(f"{label:<26} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        ours = ours or t_fb
        print(f"{label:<26}{1e3 * t_fwd:>10.2f}{flops / t_fwd / 1e12:>13.2f}{1e3 * t_fb:>13.2f}{t_fb / ours:>18.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("no CUDA device: this benchmark is for GPUs (use --dry-run with TRITON_INTERPRET=1 to check it)")
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 in the environment")
        args.lengths, args.batch, args.repeats, args.dtype = [20], 1, 1, "float32"
    dtype = DTYPES[args.dtype]
    # mLSTM heads of the paper's 125M model (inner width 1536 in 4 heads of 384, tiled by the kernels);
    # sLSTM heads of 64, the largest the fused sLSTM kernel keeps on chip
    NH, DK, DV, L = (4, 384, 384, 64) if not args.dry_run else (1, 16, 16, 16)
    S_NH, S_DH = (4, 64) if not args.dry_run else (1, 16)
    print(f"device {device}, dtype {args.dtype}, batch {args.batch}, torch {torch.__version__}")
    for T in args.lengths:
        def mlstm_inputs():
            g = [torch.randn(args.batch, NH, T, d, device=device, dtype=dtype, requires_grad=True) for d in (DK, DK, DV)]
            gates = [torch.randn(args.batch, NH, T, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
            return (*g, *gates)

        bench(f"mLSTM chunkwise T={T} (B={args.batch}, heads={NH}, DK={DK}, DV={DV}, chunk={L})",
              mlstm_candidates(), mlstm_inputs, mlstm_flops(args.batch, NH, T, DK, DV, L), args.repeats, device)

        def slstm_inputs():
            x = torch.randn(args.batch, T, S_NH, 4, S_DH, device=device, dtype=dtype, requires_grad=True)
            R = (0.1 * torch.randn(S_NH, S_DH, 4, S_DH, device=device)).requires_grad_()
            b = torch.zeros(S_NH, 4, S_DH, device=device, requires_grad=True)
            return x, R, b

        bench(f"sLSTM T={T} (B={args.batch}, heads={S_NH}, DH={S_DH})", slstm_candidates(), slstm_inputs,
              slstm_flops(args.batch, S_NH, T, S_DH), args.repeats, device)


if __name__ == "__main__":
    main()
