"""Training cost of the chunkwise mLSTM on CPU: autograd through `cells.mlstm_chunkwise` ("reference") vs
the recomputing backward of `cells.mlstm_chunkwise_recompute` ("recompute": a state per chunk kept;
"every_sqrt": state_every=None), forward + backward.

Peak memory: each (implementation, B, T) runs once in a fresh process, with glibc's mmap threshold fixed at
64 KiB so that freed tensors go back to the system (RSS then follows the live tensors); the figure is the
rise of the peak RSS (VmHWM, reset before the run) over the RSS with the inputs (Linux only). Time: both implementations alternate in one process (the
machine may be shared), median of --repeats after a warm-up. The loss reads h and the final state.

    python benchmarks/mlstm_backward.py [--B 1 8] [--T 512 2048] [--repeats 3] [--threads N]
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("reference", "recompute", "every_sqrt")  # every_sqrt: the state of every ceil(sqrt(NC))-th chunk


def functions():
    from xlstm_hf import cells

    return {"reference": cells.mlstm_chunkwise, "recompute": cells.mlstm_chunkwise_recompute,
            "every_sqrt": functools.partial(cells.mlstm_chunkwise_recompute, state_every=None)}


def make_step(fn, B, T, NH, D, chunk):
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, NH, T, D, generator=g).requires_grad_() for _ in range(3))
    i = torch.randn(B, NH, T, generator=g).requires_grad_()
    f = (torch.randn(B, NH, T, generator=g) + 3).requires_grad_()
    inputs = (q, k, v, i, f)

    def step():
        h, (C, n, _) = fn(*inputs, output_final_state=True, chunk_size=chunk)
        loss = h.square().mean() + C.mean() + n.mean()
        torch.autograd.grad(loss, inputs)

    return step


def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_memory(impl, B, T, NH, D, chunk):
    """MiB: the rise of this process's peak RSS over its RSS with the inputs, during one forward + backward
    (Linux: the peak is reset first, by writing 5 to /proc/self/clear_refs)."""
    fn = functions()[impl]
    make_step(fn, 1, chunk, NH, D, chunk)()  # warm-up at a small size (thread pools, kernels)
    step = make_step(fn, B, T, NH, D, chunk)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = status_kib("VmRSS")
    step()
    return (status_kib("VmHWM") - before) / 1024


def timings(B, T, NH, D, chunk, repeats):
    """Seconds per forward + backward of each implementation, alternating (median of `repeats`)."""
    steps = {impl: make_step(fn, B, T, NH, D, chunk) for impl, fn in functions().items()}
    times = {impl: [] for impl in steps}
    for repeat in range(repeats + 1):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            if repeat:  # the first round warms up
                times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--T", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--NH", type=int, default=4)
    parser.add_argument("--D", type=int, default=384, help="DK = DV (the 125M model: 1536 inner width / 4 heads)")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "B", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(peak_memory(args.one[0], int(args.one[1]), int(args.one[2]), args.NH, args.D, args.chunk)))
        return
    print(f"NH={args.NH} DK=DV={args.D} chunk={args.chunk} fp32, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'B':>3} {'T':>5} {'impl':>10} {'fwd+bwd s':>10} {'peak MiB':>9}   time ratio  memory ratio")
    common = ["--NH", str(args.NH), "--D", str(args.D), "--chunk", str(args.chunk), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for B in args.B:
        for T in args.T:
            peak = {impl: json.loads(subprocess.run(
                [sys.executable, __file__, "--one", impl, str(B), str(T), *common],
                capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]) for impl in IMPLS}
            seconds = timings(B, T, args.NH, args.D, args.chunk, args.repeats)
            for impl in IMPLS:
                ratio = "" if impl == "reference" else \
                    f"   {seconds[impl] / seconds['reference']:10.2f}  {peak[impl] / peak['reference']:12.2f}"
                print(f"{B:>3} {T:>5} {impl:>10} {seconds[impl]:10.2f} {peak[impl]:9.0f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
