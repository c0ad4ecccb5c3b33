"""One-command CPU benchmark suite: xlstm_hf vs the official xlstm, transformers' GPT-2 and transformers' xLSTM.

    python benchmarks/cpu_suite.py                            # full run (~30-40 min on 2 cores)
    python benchmarks/cpu_suite.py --quick --out /tmp/suite   # smoke check of the script (~3 min)
    python benchmarks/cpu_suite.py --peers xlstm_hf,gpt2 --batches 1 --dtypes fp32 --what decode

Measured side by side for every peer (model with random weights), dtype (fp32, bf16) and batch size (1, 8):
- decode: ms per step (one new token for each sequence) at contexts 16, 2048, 8192: median over steps,
  timed round-robin over the contexts;
- prefill: tokens/s of one no-grad forward over a prompt of T = 512, 2048, 8192 producing the last logits;
- training: tokens/s of forward + backward + AdamW step at T = 512, and the peak RSS of that process;
- the machine's limits (streaming-read bandwidth, fp32/bf16 matmul GFLOP/s), from which each figure's
  bound is derived; every figure is printed as a ratio to its bound and to xlstm_hf, with a goals table.

Measurements run in subprocesses (`--worker PEER --what ... --dtype ... --batches ...`, printing one JSON
line per measurement): one per peer and dtype for decode + prefill, one per peer, dtype and batch for
training (so its peak RSS is its own). Memory is freed between them and a crash or an out-of-memory kill
loses only that group. Measurements predicted to exceed the per-measurement time budget or the memory
limit are skipped and shown as "n/a: >budget" / "n/a: memory". Methods and bound formulas:
benchmarks/README.md.

Writes OUT/cpu_suite.md (tables), OUT/cpu_suite.json (raw records and bounds), OUT/decode_vs_context.png
and OUT/prefill_vs_length.png (OUT defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _extras import SMALL_MODELS  # noqa: E402  (benchmarks/ is not a package)

RESULT_TAG = "@@RESULT "
GB = 1e9
WHATS = ("decode", "prefill", "train", "small", "lossmem", "compile")
#: the measurements of _extras.py: fp32 only, one worker each, for these peers
EXTRAS = {"small": ("xlstm_hf", "official", "gpt2"), "lossmem": ("xlstm_hf",), "compile": ("xlstm_hf",)}


# ==================================================================================================
# Settings
# ==================================================================================================


@dataclass
class Settings:
    """Sizes, repetitions and limits of a run."""

    contexts: tuple[int, ...] = (16, 2048, 8192)  # decode
    prefill_lengths: tuple[int, ...] = (512, 2048, 8192)
    train_lengths: tuple[int, ...] = (512,)
    batches: tuple[int, ...] = (1, 8)  # default of --batches
    decode_steps: int = 12  # timed steps per decode measurement (median reported)
    decode_warmup: int = 2
    max_reps: int = 3  # prefill / training repetitions (best reported), as many as fit in rep_budget_s
    rep_budget_s: float = 20.0
    budget_s: float = 75.0  # a measurement predicted to take longer (one repetition) is skipped
    mem_limit_gb: float = 16.0  # a measurement with a higher estimated peak RSS is skipped
    hard_mem_gb: float = 18.0  # a worker above this RSS is killed
    machine_buffer_mib: int = 1024
    goal_prefill_T: int = 2048
    # one worker per (peer, dtype) for decode + prefill, one per (peer, dtype, batch) for training (so its
    # peak RSS is that measurement's); --quick runs everything of a (peer, dtype) in one worker
    worker_groups: tuple[tuple[str, ...], ...] = (("decode", "prefill"), ("train",))
    train_worker_per_batch: bool = True


QUICK = Settings(contexts=(16, 96), prefill_lengths=(64, 256), train_lengths=(64,), batches=(1, 2), decode_steps=4,
                 decode_warmup=1, max_reps=1, rep_budget_s=2.0, budget_s=20.0, machine_buffer_mib=256,
                 goal_prefill_T=256, worker_groups=(("decode", "prefill", "train"),), train_worker_per_batch=False)


def settings_for(args) -> Settings:
    return QUICK if args.quick else Settings()


def sizes_for(what: str, s: Settings) -> tuple[int, ...]:
    """The sizes of a measurement (for the extras: placeholders, one item per worker)."""
    return {"decode": s.contexts, "prefill": s.prefill_lengths, "train": s.train_lengths}.get(what, (0,))


# ==================================================================================================
# Facts about this process and machine, one helper each (Linux reads /proc; macOS and Windows have their own
# sources; a fact with no source is None / "unknown", never an exception)
# ==================================================================================================

PROC_STATUS = Path("/proc/self/status")
PROC_CPUINFO = Path("/proc/cpuinfo")


def _proc_field(path: Path, key: str) -> str | None:
    """The value after `key:` on the first line of a /proc-style `key: value` file that has it; None when
    the file cannot be read (not Linux) or has no such line."""
    try:
        with open(path) as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes: VmHWM of /proc/self/status on Linux, else
    getrusage's ru_maxrss (bytes on macOS, kilobytes on Linux and the BSDs), else (Windows) psutil's peak
    working set; None when no source is available."""
    if sys.platform.startswith("linux"):
        hwm = _proc_field(PROC_STATUS, "VmHWM")  # "123456 kB"
        if hwm and hwm.split()[0].isdigit():
            return int(hwm.split()[0]) * 1024
    try:
        import resource
    except ImportError:  # Windows
        resource = None
    if resource is not None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024
    try:
        import psutil  # the parent side needs it anyway (a transitive dependency of accelerate)

        info = psutil.Process().memory_info()
    except Exception:  # noqa: BLE001 - not installed, or no access: report no figure
        return None
    peak = getattr(info, "peak_wset", None)  # Windows
    return int(peak) if peak is not None else None


def _sysctl(name: str) -> str | None:
    """`sysctl -n NAME` (macOS, BSDs), or None."""
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux (x86 "model name"; ARM boards: "Hardware"/"Model"),
    sysctl's machdep.cpu.brand_string on macOS, else platform.processor() / platform.machine(), else
    "unknown"."""
    name = None
    if sys.platform.startswith("linux"):
        name = next(filter(None, (_proc_field(PROC_CPUINFO, key) for key in ("model name", "Hardware", "Model"))),
                    None)
    elif sys.platform == "darwin":
        name = _sysctl("machdep.cpu.brand_string")
    return name or platform.processor() or platform.machine() or "unknown"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the platform has none (Windows)."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def format_load(value) -> str:
    return "n/a" if not value else f"{value[0]:.2f}"


# ==================================================================================================
# Worker side: one process per measurement group, printing one JSON line per measurement
# ==================================================================================================


def emit(record: dict) -> None:
    print(RESULT_TAG + json.dumps(record), flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat_best(fn, first: float, s: Settings) -> tuple[float, int]:
    """Best time of `fn` over as many repetitions as fit in the repetition budget (`first` already ran)."""
    times = [first]
    while len(times) < s.max_reps and sum(times) + first <= s.rep_budget_s:
        times.append(timed(fn))
    return min(times), len(times)


def measure_machine(args, s: Settings) -> dict:
    """Streaming-read bandwidth (best of 5 torch.sum over a fp32 buffer; also a copy) and matmul
    GFLOP/s (best of 3 square torch.mm at 2048 and 4096, fp32 and bf16), with this run's thread count."""
    import torch

    n = s.machine_buffer_mib * 2**20 // 4
    x = torch.ones(n)
    x.sum()
    read_s = min(timed(x.sum) for _ in range(5))
    y = torch.empty_like(x)
    copy_s = min(timed(lambda: y.copy_(x)) for _ in range(3))
    del x, y
    gflops = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        # growing sizes, stopping where a product would take over 5 s: without AVX-512 BF16 or AMX, bf16
        # matmuls run at ~1 GFLOP/s (a 4096^2 product would take minutes)
        for size in (512, 1024, 2048) if args.quick else (512, 1024, 2048, 4096):
            if best and 2 * size**3 / (best * 1e9) > 5.0:
                break
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            torch.mm(a, b)
            best = max(best, 2 * size**3 / min(timed(lambda: torch.mm(a, b)) for _ in range(3)) / 1e9)
        gflops[name] = best
    return {"kind": "machine", "read_gbs": n * 4 / read_s / GB, "copy_gbs": 2 * n * 4 / copy_s / GB,
            "buffer_mib": s.machine_buffer_mib, "matmul_gflops": gflops}


class Worker:
    """Runs one measurement group: `--worker PEER --what decode,prefill,train --dtype D --batches 1,8`
    (`--sizes` overrides the run's sizes when a single kind is measured)."""

    def __init__(self, args, s: Settings):
        import torch

        from _peers import DTYPES, GPT2_VOCAB, PEERS

        self.torch, self.args, self.s = torch, args, s
        self.dtype = DTYPES[args.dtype]
        self.whats = args.what
        self.batches = [int(b) for b in args.batches.split(",")]
        self.sizes = {w: ([int(t) for t in args.sizes.split(",")] if args.sizes else list(sizes_for(w, s)))
                      for w in self.whats}
        longest = max(max(v) for v in self.sizes.values())
        extra = s.decode_warmup + s.decode_steps + 1
        run_longest = max(max(sizes_for(w, s)) for w in ("decode", "prefill", "train"))
        self.peer = PEERS[args.worker](max_len=longest + extra, run_max_len=run_longest + extra)
        torch.manual_seed(0)
        self.ids = torch.randint(0, GPT2_VOCAB, (max(self.batches), longest + extra))
        self.model, self.model_kind = None, None

    def use_model(self, train: bool):
        """The model for inference (in the run's dtype) or training (fp32 weights), built on first use."""
        if self.model_kind != train:
            self.model = None  # free the other one first
            self.model = self.peer.build(self.torch.float32 if train else self.dtype, train=train)
            self.model.train(train)
            self.model_kind = train
            self.prof = self.peer.profile(self.model)
            emit({"kind": "profile", "peer": self.args.worker, "title": self.peer.title, "notes": self.peer.notes,
                  **self.prof})
        return self.model

    def record(self, what: str, batch: int, size: int, **fields) -> dict:
        return {"kind": "result", "peer": self.args.worker, "what": what, "dtype": self.args.dtype,
                "batch": batch, "size": size, **fields}

    def too_big(self, what: str, batch: int, size: int) -> str | None:
        need = self.peer.memory_estimate(what, batch, size, self.dtype, self.prof["params_total"])
        if need > self.s.mem_limit_gb * GB:
            return f"n/a: memory (est. {need / GB:.0f} GB > {self.s.mem_limit_gb:.0f})"
        return None

    # ---- decode ----
    def decode(self):
        """Decode: prefill a batch-1 state to each context in turn (untimed) and keep a copy per context; then per
        batch size, copy those to the batch (identical rows: a step's cost does not depend on the content) and
        time single-token steps round-robin over the contexts, so that a drift of the machine's speed hits all
        contexts alike. A context whose prefill is predicted to exceed twice the budget is skipped."""
        torch, peer, s = self.torch, self.peer, self.s
        model = self.use_model(train=False)
        with torch.no_grad():
            warm = peer.extend(model, peer.new_state(model), self.ids[:1, :32])  # first-call costs, untimed
            peer.step(model, self.ids[:1, 32:33], peer.replicate(warm, 1))
            del warm
            masters, info = self.decode_contexts(model)
            for B in self.batches:
                contexts = self.decode_fit(B, list(masters))
                results = self.decode_batch(model, {L: masters[L] for L in contexts}, B)
                for L in masters:
                    if L in results:
                        emit(self.record("decode", B, L, status="ok", **results[L], **info[L]))
                    else:
                        emit(self.record("decode", B, L, status="skip", reason=self.too_big("decode", B, L)
                                         or "n/a: memory (contexts together)"))

    def decode_contexts(self, model):
        """{context: batch-1 state} built by one incremental prefill, and per context its prefill time and
        notes; contexts over budget are reported as skipped here."""
        import copy

        peer, s = self.peer, self.s
        masters, info, master, pos, rate, skip = {}, {}, peer.new_state(model), 0, None, None
        for L in self.sizes["decode"]:
            if skip is None and rate is not None and (L - pos) / rate > 2 * s.budget_s:
                skip = f"n/a: >budget (context prefill est. {(L - pos) / rate:.0f} s)"
            if skip:
                for B in self.batches:
                    emit(self.record("decode", B, L, status="skip", reason=skip))
                continue
            t = timed(lambda: peer.extend(model, master, self.ids[:1, pos:L]))
            if L - pos >= 256:  # short prefills say little about the rate of long ones
                rate = (L - pos) / t
            pos = L
            masters[L] = copy.deepcopy(master)
            info[L] = {"context_prefill_s": t, "notes": []}
            if hasattr(peer, "check_state_conversion") and L <= 64:
                diff = peer.check_state_conversion(model, self.ids[:1, :L])
                info[L]["notes"].append(f"state conversion checked at context {L}: max |dlogits| = {diff:.1e}")
        return masters, info

    def decode_fit(self, B: int, contexts: list[int]) -> list[int]:
        """The contexts whose batch-B states fit in memory together (dropping the longest first)."""
        while contexts and self.too_big("decode", B, sum(contexts)):
            contexts = contexts[:-1]
        return contexts

    def decode_batch(self, model, masters: dict, B: int) -> dict:
        """Per context: median ms of `decode_steps` steps (after `decode_warmup`), timed round-robin."""
        peer, s = self.peer, self.s
        states = {L: peer.replicate(master, B) for L, master in masters.items()}
        state_bytes = {L: peer.state_bytes(state) for L, state in states.items()}
        times = {L: [] for L in states}
        for k in range(s.decode_warmup + s.decode_steps):
            for L, state in states.items():
                token = self.ids[:1, L + k:L + k + 1].expand(B, 1).contiguous()
                t = timed(lambda: peer.step(model, token, state))
                if k >= s.decode_warmup:
                    times[L].append(t)
        del states
        weight_bytes = self.prof["params_read_per_token"] * self.torch.finfo(self.dtype).bits // 8
        out = {}
        for L, ts in times.items():
            ms = 1000 * statistics.median(ts)
            traffic = (2 if peer.recurrent else 1) * state_bytes[L]  # recurrent: read + rewrite; KV cache: read
            out[L] = {"value": ms, "unit": "ms/step", "min_ms": 1000 * min(ts), "steps": len(ts),
                      "tokens_per_s": B * 1000 / ms, "state_bytes": state_bytes[L], "weight_bytes": weight_bytes,
                      "bytes_per_step": weight_bytes + traffic}
        return out

    # ---- prefill ----
    def prefill(self):
        """Prefill: for each length (ascending) and batch, best time of one no-grad forward producing the last
        logits. A measurement's time is predicted from the previous one (FLOP ratio, or (T/T')^2 for peers
        whose cost is dominated by T x T matrices); over budget: skipped, as are longer ones."""
        torch, peer, s = self.torch, self.peer, self.s
        model = self.use_model(train=False)
        with torch.no_grad():
            peer.prefill(model, self.ids[:1, :64])  # warm-up
            last, over = None, set()
            for T in self.sizes["prefill"]:
                for B in self.batches:
                    flops = B * peer.flops_per_sequence(model, T, self.prof, all_logits=False)
                    rec = self.record("prefill", B, T, flops_per_token=flops / (B * T))
                    reason = self.too_big("prefill", B, T) or ("n/a: >budget" if B in over else None)
                    if reason is None and last is not None:
                        est = peer.predict_prefill_seconds(*last, B, T, flops)
                        if est > s.budget_s:
                            reason = f"n/a: >budget (est. {est:.0f} s)"
                            over.add(B)
                    if reason:
                        emit({**rec, "status": "skip", "reason": reason})
                        continue
                    ids = self.ids[:B, :T]
                    first = timed(lambda: peer.prefill(model, ids))
                    best, reps = repeat_best(lambda: peer.prefill(model, ids), first, s)
                    last = (first, B, T, flops)
                    emit({**rec, "status": "ok", "value": B * T / best, "unit": "tok/s", "seconds": best, "reps": reps,
                          "peak_rss": peak_rss_bytes()})

    # ---- training ----
    def train(self):
        """Training: forward + backward + AdamW step on labels = inputs; fp32 weights, bf16 autocast for
        bf16. A warm-up step at batch 1 (one-time costs: lazy initialisation, AdamW state), then the best of
        up to max_reps timed steps at the batch size."""
        torch, peer, s = self.torch, self.peer, self.s
        model = self.use_model(train=True)
        rss_base = _proc_field(PROC_STATUS, "VmRSS")  # "123456 kB": interpreter, libraries, weights
        rss_base = int(rss_base.split()[0]) * 1024 if rss_base and rss_base.split()[0].isdigit() else None
        # fused AdamW: what Trainer uses by default (optim="adamw_torch_fused"); the for-loop AdamW took
        # ~1.4 s of a 5 s xlstm_hf step on the 164M models
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        use_autocast = self.dtype == torch.bfloat16
        last = None  # (seconds, batch) of the previous measurement, for the time prediction

        def step(ids):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                loss = peer.train_loss(model, ids)
            loss.backward()
            opt.step()

        for T in self.sizes["train"]:
            warm = None
            for B in self.batches:
                flops = B * 3 * peer.flops_per_sequence(model, T, self.prof, all_logits=True)
                rec = self.record("train", B, T, flops_per_token=flops / (B * T),
                                  params_total=self.prof["params_total"])
                reason = self.too_big("train", B, T)
                if reason is None and last is not None and last[0] * B / last[1] > s.budget_s:
                    reason = f"n/a: >budget (est. {last[0] * B / last[1]:.0f} s/step)"
                if reason:
                    emit({**rec, "status": "skip", "reason": reason})
                    continue
                if warm is None:
                    warm = timed(lambda: step(self.ids[:1, :T]))
                ids = self.ids[:B, :T]
                first = timed(lambda: step(ids))
                best, reps = repeat_best(lambda: step(ids), first, s)
                last = (best, B)
                emit({**rec, "status": "ok", "value": B * T / best, "unit": "tok/s", "seconds": best, "reps": reps,
                      "warmup_s": warm, "peak_rss": peak_rss_bytes(), "rss_base": rss_base})

    # ---- the extras (_extras.py) ----
    def extras(self, what: str):
        import _extras

        fn = {"small": lambda: _extras.measure_small(self.args.worker),
              "lossmem": lambda: _extras.measure_lossmem(peak_rss_bytes), "compile": _extras.measure_compile}[what]
        for rec in fn():
            emit({"kind": "result", "peer": self.args.worker, "dtype": self.args.dtype, **rec})

    def run(self):
        for what in self.whats:
            if what in EXTRAS:
                self.extras(what)
            else:
                getattr(self, what)()


def worker_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    s = settings_for(args)
    if args.worker == "machine":
        emit(measure_machine(args, s))
        return
    Worker(args, s).run()


# ==================================================================================================
# Parent side: the plan, the subprocesses, the progress bar
# ==================================================================================================


@dataclass
class Group:
    """One worker process: a peer, what to measure, a dtype, batch sizes; `items` are (what, batch, size)."""

    peer: str
    whats: tuple[str, ...] = ()
    dtype: str = "fp32"
    batches: tuple[int, ...] = (1,)
    items: list = field(default_factory=list)

    @staticmethod
    def label(peer, dtype, what=None, B=None, T=None) -> str:
        if what is None:
            return f"{peer} {dtype}"
        return f"{what} {peer} {dtype} B={B} {'ctx' if what == 'decode' else 'T'}={T}"

    def name(self) -> str:
        return "_".join([self.peer, self.dtype, *self.whats, "B" + "-".join(map(str, self.batches))])

    def command(self, args) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", self.peer, "--threads", str(args.threads)]
        if self.peer != "machine":
            cmd += ["--what", ",".join(self.whats), "--dtype", self.dtype,
                    "--batches", ",".join(map(str, self.batches))]
        return cmd + (["--quick"] if args.quick else [])


# rough relative cost per peer, only for the progress bar's ETA (which rescales itself as items finish)
SPEED_GUESS = {"xlstm_hf": 1.0, "official": 2.0, "gpt2": 0.8, "hf_xlstm": 0.7}
STARTUP_S = 8.0


def item_cost(peer: str, dtype: str, what: str, B: int, T: int, s: Settings) -> float:
    """A guess of an item's seconds (uncontended 2-core machine), for the ETA only."""
    f = SPEED_GUESS.get(peer, 1.0) * (0.6 if dtype == "bf16" else 1.0)
    if what in EXTRAS:
        return f * {"small": 30.0, "lossmem": 20.0, "compile": 300.0}[what]
    if what == "decode":
        return f * (0.03 * B * (s.decode_steps + s.decode_warmup) + T / 800)
    if what == "prefill":
        return min(s.budget_s + s.rep_budget_s, f * B * T / 400 * (2 if T < 4096 else 1))
    return min(s.budget_s * 2, f * B * T / 150 * (3 if B == 1 else 2))


def plan(args, s: Settings) -> list[Group]:
    """The worker groups in run order: machine limits, then per peer and dtype the groups of `s.worker_groups`."""
    groups = [Group("machine")]
    for peer in args.peers:
        for dtype in args.dtypes:
            for whats in s.worker_groups:
                whats = tuple(w for w in whats if w in args.what and w not in EXTRAS)
                split = ("train",) == whats and s.train_worker_per_batch
                for batches in ([(B,) for B in args.batches] if split else [tuple(args.batches)]):
                    items = [(w, B, T) for w in whats for T in sizes_for(w, s) for B in batches]
                    if items:
                        groups.append(Group(peer, whats, dtype, batches, items))
    for what, peers in EXTRAS.items():  # fp32, after the main measurements
        if what in args.what and "fp32" in args.dtypes:
            groups += [Group(p, (what,), "fp32", (1,), [(what, 1, 0)]) for p in peers if p in args.peers]
    return groups


def train_prediction(group: Group, results: list[dict], s: Settings) -> str | None:
    """Skip reason for a training group of one batch size from the same peer's result at a smaller batch
    (time and activation memory scale with the batch), or None."""
    if group.whats != ("train",) or len(group.batches) != 1:
        return None
    (B,) = group.batches
    smaller = [r for r in results if r.get("kind") == "result" and r["status"] == "ok" and r["what"] == "train"
               and r["peer"] == group.peer and r["dtype"] == group.dtype and r["batch"] < B]
    if not smaller:
        return None
    ref = max(smaller, key=lambda r: r["batch"])
    scale = B / ref["batch"]
    if ref["seconds"] * scale > s.budget_s:
        return f"n/a: >budget (est. {ref['seconds'] * scale:.0f} s/step)"
    if not ref.get("peak_rss"):  # no peak-RSS source on this platform: no memory prediction
        return None
    static = 0.6 * GB + 16 * ref["params_total"]  # interpreter + fp32 weights, grads, AdamW moments
    est_rss = static + 1.25 * (ref["peak_rss"] - static) * scale  # +25%: GPT-2 measured 2.2 -> 2.8 MB/token
    if est_rss > s.mem_limit_gb * GB:
        return f"n/a: memory (est. {est_rss / GB:.0f} GB > {s.mem_limit_gb:.0f})"
    return None


def run_group(group: Group, args, s: Settings, results: list[dict], bar) -> None:
    """Run one worker, stream its records into `results` and advance the bar per item; kill it when its RSS
    passes the hard limit or it stays silent too long; record the items it never reported as n/a."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    log_path = Path(args.log_dir) / f"{group.name()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(group.command(args), stdout=subprocess.PIPE, stderr=log, text=True, env=env, bufsize=1)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    pending = list(group.items)

    def describe():
        bar.set_description(Group.label(group.peer, group.dtype, *pending[0]) if pending else group.peer)

    describe()
    silent_limit = 3 * s.budget_s + (1800 if "compile" in group.whats else 300)  # compiling prints nothing
    last, failure = time.time(), None
    while True:
        try:
            line = lines.get(timeout=0.25)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line.startswith(RESULT_TAG):
            last = time.time()
            record = json.loads(line[len(RESULT_TAG):])
            results.append(record)
            key = (record.get("what"), record.get("batch"), record.get("size"))
            if record.get("what") in EXTRAS:  # one placeholder item per extras worker, several records
                key = next((k for k in pending if k[0] == record["what"]), key)
            if record.get("kind") == "result" and key in pending:
                pending.remove(key)
                bar.update(item_cost(group.peer, group.dtype, *key, s))
                outcome = f"{record['value']:.1f} {record['unit']}" if record["status"] == "ok" else record["reason"]
                bar.write(f"  {Group.label(group.peer, group.dtype, *key)}: {outcome}")
                describe()
            continue
        try:
            rss = psutil.Process(proc.pid).memory_info().rss
        except psutil.Error:
            rss = 0
        if rss > s.hard_mem_gb * GB:
            failure = f"n/a: memory (killed at {rss / GB:.0f} GB)"
        elif time.time() - last > silent_limit:
            failure = f"n/a: timeout (silent > {silent_limit:.0f} s)"
        if failure:
            proc.kill()
            break
    proc.wait()
    if proc.returncode and not failure:
        tail = [line for line in log_path.read_text().splitlines() if line.strip()][-1:] or ["?"]
        failure = f"n/a: error ({tail[0].strip()[:160]})"
    for key in pending:  # items the worker never reported
        results.append({"kind": "result", "peer": group.peer, "what": key[0], "dtype": group.dtype, "batch": key[1],
                        "size": key[2], "status": "skip", "reason": failure or "n/a: not reported"})
        bar.update(item_cost(group.peer, group.dtype, *key, s))
        bar.write(f"  {Group.label(group.peer, group.dtype, *key)}: {failure}")


#: bf16 prefill and training are skipped where bf16 matmuls run below this fraction of fp32's speed (CPUs
#: without AVX-512 BF16 or AMX: ~1 GFLOP/s, where one measurement would take many minutes)
SLOW_BF16_FRACTION = 0.25


def without_slow_bf16(group: Group, results: list[dict]) -> tuple[Group, str | None]:
    """The group without its bf16 matmul-bound items (prefill, training) when this machine's bf16 matmuls
    are slow, and the skip reason (None when nothing is dropped). Decoding is bandwidth-bound and stays."""
    machine = next((r for r in results if r.get("kind") == "machine"), None)
    if group.dtype != "bf16" or machine is None:
        return group, None
    fp32, bf16 = machine["matmul_gflops"]["fp32"], machine["matmul_gflops"]["bf16"]
    if bf16 >= SLOW_BF16_FRACTION * fp32:
        return group, None
    reason = f"n/a: slow bf16 matmul on this CPU ({bf16:.1f} vs {fp32:.0f} GFLOP/s fp32)"
    whats = tuple(w for w in group.whats if w == "decode")
    return Group(group.peer, whats, group.dtype, group.batches, [i for i in group.items if i[0] in whats]), reason


def run_all(args, s: Settings) -> list[dict]:
    from tqdm import tqdm

    groups = plan(args, s)
    costs = [STARTUP_S + sum(item_cost(g.peer, g.dtype, *item, s) for item in g.items) for g in groups]
    results: list[dict] = []
    fmt = "{desc:<40.40} {percentage:3.0f}%|{bar:20}| {elapsed} elapsed, ETA {remaining}"
    with tqdm(total=sum(costs), bar_format=fmt, dynamic_ncols=True) as bar:
        for group, cost in zip(groups, costs):
            start = bar.n

            def skip(items, reason):
                for what, B, T in items:
                    results.append({"kind": "result", "peer": group.peer, "what": what, "dtype": group.dtype,
                                    "batch": B, "size": T, "status": "skip", "reason": reason})
                    bar.write(f"  {Group.label(group.peer, group.dtype, what, B, T)}: {reason}")

            kept, slow = without_slow_bf16(group, results)
            skip([i for i in group.items if i not in kept.items], slow)
            group = kept
            reason = train_prediction(group, results, s)
            if reason:
                skip(group.items, reason)
            elif group.items or group.peer == "machine":  # (the machine group has no items)
                run_group(group, args, s, results, bar)
            bar.update(max(0.0, start + cost - bar.n))  # the group's startup share
    return results


# ==================================================================================================
# Report: bounds, ratios, goals, tables, plots
# ==================================================================================================


def machine_description(args) -> dict:
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for module in ("xlstm", "mlstm_kernels"):
        try:
            from importlib.metadata import version

            versions[module] = version(module)
        except Exception:  # noqa: BLE001 - only informative
            versions[module] = "not installed"
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "threads": args.threads, "versions": versions,
            "load_average_start": load_average()}


def _small_models() -> dict:
    return SMALL_MODELS


class Report:
    """Turns the raw records into bounds, ratios and markdown tables."""

    def __init__(self, data: dict, s: Settings):
        self.data, self.s = data, s
        records = data["results"]
        self.machine = next((r for r in records if r.get("kind") == "machine"), None)
        self.profiles = {r["peer"]: r for r in records if r.get("kind") == "profile"}
        self.results = {(r["peer"], r["what"], r["dtype"], r["batch"], r["size"]): r
                        for r in records if r.get("kind") == "result"}
        self.peers = data["args"]["peers"]
        self.dtypes = data["args"]["dtypes"]
        self.batches = data["args"]["batches"]

    # ---- numbers ----
    def get(self, peer, what, dtype, batch, size) -> dict | None:
        r = self.results.get((peer, what, dtype, batch, size))
        return r if r and r["status"] == "ok" else None

    def bound(self, r: dict) -> float | None:
        """Decode: ms/step = bytes per step / read bandwidth. Prefill and training: tok/s = matmul
        GFLOP/s of the dtype (bf16 autocast trains with bf16 matmuls) / FLOPs per token."""
        if not self.machine or not r:
            return None
        if r["what"] == "decode":
            return r["bytes_per_step"] / (self.machine["read_gbs"] * GB) * 1000 if "bytes_per_step" in r else None
        if "flops_per_token" not in r:
            return None
        return self.machine["matmul_gflops"][r["dtype"]] * 1e9 / r["flops_per_token"]

    def bound_ratio(self, r: dict) -> float | None:
        """Decode: time / bound time (>= 1, lower is better). Others: throughput / bound (<= 1)."""
        b = self.bound(r)
        return None if not b or not r or r.get("status") != "ok" else r["value"] / b

    def speedup(self, what, dtype, batch, size, peer) -> float | None:
        """How many times faster xlstm_hf is than `peer` on this measurement."""
        ours, theirs = self.get("xlstm_hf", what, dtype, batch, size), self.get(peer, what, dtype, batch, size)
        if not ours or not theirs:
            return None
        return theirs["value"] / ours["value"] if what == "decode" else ours["value"] / theirs["value"]

    # ---- formatting ----
    def cell(self, key) -> str:
        r = self.results.get(key)
        if r is None:
            return "-"
        if r["status"] != "ok":
            return r["reason"].split(" (")[0] if len(r["reason"]) > 40 else r["reason"]
        ratio = self.bound_ratio(r)
        if r["what"] == "decode":
            text = f"{r['value']:.1f}"
            return text + (f" ({ratio:.1f}x bd)" if ratio else "")
        text = f"{r['value']:.0f}"
        return text + (f" ({100 * ratio:.0f}% bd)" if ratio else "")

    @staticmethod
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return out + ["| " + " | ".join(row) + " |" for row in rows]

    def sizes(self, what) -> list[int]:
        return sorted({k[4] for k in self.results if k[1] == what})

    def figure_tables(self, what: str, title: str, unit: str) -> list[str]:
        sizes = self.sizes(what)
        if not sizes:
            return []
        name = "ctx" if what == "decode" else "T"
        lines = [f"### {title}", ""]
        rows = []
        for dtype in self.dtypes:
            for B in self.batches:
                for peer in self.peers:
                    row = [dtype, str(B), peer] + [self.cell((peer, what, dtype, B, T)) for T in sizes]
                    if what == "train":
                        r = self.get(peer, what, dtype, B, sizes[0])
                        row.append(f"{r['peak_rss'] / GB:.2f}" if r and r.get("peak_rss") else "-")
                    rows.append(row)
        header = ["dtype", "batch", "peer"] + [f"{name}={T} {unit}" for T in sizes]
        lines += self.table(header + (["peak RSS GB"] if what == "train" else []), rows) + [""]
        others = [p for p in self.peers if p not in ("xlstm_hf", "xlstm_hf_large")]
        if "xlstm_hf" in self.peers and others:
            lines += [f"xlstm_hf speed-up over each peer ({what}; >1 = xlstm_hf faster):", ""]
            rows = []
            for dtype in self.dtypes:
                for B in self.batches:
                    for peer in others:
                        ups = [self.speedup(what, dtype, B, T, peer) for T in sizes]
                        rows.append([dtype, str(B), f"vs {peer}"] + [f"{u:.2f}x" if u else "-" for u in ups])
            lines += self.table(["dtype", "batch", "peer"] + [f"{name}={T}" for T in sizes], rows) + [""]
        if "xlstm_hf_large" in self.peers and "hf_xlstm" in self.peers:
            lines += [f"xlstm_hf's large design over transformers' xLSTM on the same weights ({what}; >1 = "
                      "xlstm_hf faster):", ""]
            rows = [[dtype, str(B)] + [f"{u:.2f}x" if (u := self.ratio("xlstm_hf_large", "hf_xlstm", what, dtype, B, T))
                                       else "-" for T in sizes] for dtype in self.dtypes for B in self.batches]
            lines += self.table(["dtype", "batch"] + [f"{name}={T}" for T in sizes], rows) + [""]
        return lines

    # ---- goals ----
    def ratio(self, a: str, b: str, what, dtype, batch, size) -> float | None:
        """How many times faster peer `a` is than peer `b` on one measurement."""
        ra, rb = self.get(a, what, dtype, batch, size), self.get(b, what, dtype, batch, size)
        if not ra or not rb:
            return None
        return rb["value"] / ra["value"] if what in ("decode", "small") else ra["value"] / rb["value"]

    def activation_bytes_per_token(self, peer, B, T) -> float | None:
        """Training memory per token beyond the static part: (peak RSS - RSS after building the model - grads
        and AdamW moments, 12 bytes per parameter) / tokens."""
        r = self.get(peer, "train", "fp32", B, T)
        if not r or not r.get("peak_rss") or not r.get("rss_base"):
            return None
        return (r["peak_rss"] - r["rss_base"] - 12 * r["params_total"]) / (B * T)

    def goals(self) -> list[tuple[str, callable]]:
        """(description, fn() -> (passed, text) or None), judged on fp32 figures (the issue's goals)."""
        ctxs, s = self.sizes("decode"), self.s
        T_goal = s.goal_prefill_T if s.goal_prefill_T in self.sizes("prefill") else (self.sizes("prefill") or [0])[-1]
        T_train = (self.sizes("train") or [0])[0]
        B_big = max(self.batches) if self.batches else 8

        def decode_bound(B, limit):
            ratios = [self.bound_ratio(self.get("xlstm_hf", "decode", "fp32", B, L)) for L in ctxs]
            ratios = [r for r in ratios if r]
            return (max(ratios) <= limit, f"{max(ratios):.2f}x bound") if ratios else None

        def decode_flat():
            base = self.get("xlstm_hf", "decode", "fp32", 1, ctxs[0]) if ctxs else None
            others = [self.get("xlstm_hf", "decode", "fp32", 1, L) for L in ctxs[1:]]
            if not base or not others or not all(others):
                return None
            worst = max(abs(r["value"] / base["value"] - 1) for r in others)
            return worst <= 0.05, f"{100 * worst:.0f}% max change"

        def faster(a, b, what, B, size, limit):
            sizes = ctxs if what == "decode" else [size]
            ups = [u for u in (self.ratio(a, b, what, "fp32", B, L) for L in sizes) if u]
            return (min(ups) >= limit, f"{min(ups):.2f}x") if ups else None

        def bound(what, B, T, limit):
            r = self.bound_ratio(self.get("xlstm_hf", what, "fp32", B, T))
            return (r >= limit, f"{100 * r:.0f}% of bound") if r else None

        def train_memory():
            ours, theirs = (self.activation_bytes_per_token(p, 1, T_train) for p in ("xlstm_hf", "gpt2"))
            if ours is None or theirs is None:
                return None
            return ours <= theirs, f"{ours / 1e6:.2f} vs GPT-2 {theirs / 1e6:.2f} MB/token"

        def lossmem():
            r = self.get("xlstm_hf", "lossmem", "fp32", 1, self.sizes("lossmem")[0]) if self.sizes("lossmem") else None
            return (r["value"] <= 1.5, f"{r['value']:.2f} GiB") if r else None

        def small(index, peers):
            ups = [(p, self.ratio("xlstm_hf", p, "small", "fp32", self.small_batch(index), index)) for p in peers]
            if not all(u for _, u in ups):
                return None
            return min(u for _, u in ups) > 1, ", ".join(f"{u:.2f}x vs {p}" for p, u in ups)

        def compiled():
            r = next((r for k, r in self.results.items() if k[1] == "compile" and r["status"] == "ok"), None)
            if not r:
                return None
            up, (at_t, second, third) = r["value"] / r["eager_tok_s"], r["graphs"]
            return up > 1 and third == second, (f"{up:.2f}x eager, compile {r['compile_seconds']:.0f} s; graphs "
                                                f"{at_t} / {second} / {third} after lengths T, T+8, T+16")

        names = list(_small_models())
        return [
            ("decode B=1 <= 1.2x bandwidth bound (worst context)", lambda: decode_bound(1, 1.2)),
            (f"decode B={B_big} <= 2x bandwidth bound (worst context)", lambda: decode_bound(B_big, 2.0)),
            (f"decode flat over context (+-5%, {ctxs[0] if ctxs else '?'} to {ctxs[-1] if ctxs else '?'}), B=1",
             decode_flat),
            ("decode B=1 >= 2x faster than official step() (worst context)",
             lambda: faster("xlstm_hf", "official", "decode", 1, None, 2.0)),
            (f"prefill T={T_goal} B=1 >= 85% of matmul bound", lambda: bound("prefill", 1, T_goal, 0.85)),
            (f"prefill T={T_goal} B={B_big} >= 80% of matmul bound", lambda: bound("prefill", B_big, T_goal, 0.80)),
            (f"training T={T_train} B=1 >= 60% of matmul bound", lambda: bound("train", 1, T_train, 0.60)),
            (f"training T={T_train} B={B_big} runs, >= 45% of matmul bound",
             lambda: bound("train", B_big, T_train, 0.45)),
            (f"training T={T_train} B=1 activation memory per token <= GPT-2's", train_memory),
            (f"large design vs hf_xlstm, same weights: prefill T={T_goal} B=1 >= 1.3x",
             lambda: faster("xlstm_hf_large", "hf_xlstm", "prefill", 1, T_goal, 1.3)),
            (f"large design vs hf_xlstm, same weights: training T={T_train} B=1 >= 1.3x",
             lambda: faster("xlstm_hf_large", "hf_xlstm", "train", 1, T_train, 1.3)),
            ("large design vs hf_xlstm, same weights: decode B=1 >= 1.3x (worst context)",
             lambda: faster("xlstm_hf_large", "hf_xlstm", "decode", 1, None, 1.3)),
            (f"large design vs hf_xlstm, same weights: decode B={B_big} >= 1.3x (worst context)",
             lambda: faster("xlstm_hf_large", "hf_xlstm", "decode", B_big, None, 1.3)),
            ("forward with labels, 20,000 tokens, demo model: peak RSS <= 1.5 GiB", lossmem),
            (f"small {names[0]} fwd+bwd faster than official and GPT-2", lambda: small(0, ("official", "gpt2"))),
            (f"small {names[1]} fwd+bwd faster than GPT-2", lambda: small(1, ("gpt2",))),
            (f"small {names[2]} fwd+bwd faster than GPT-2", lambda: small(2, ("gpt2",))),
            ("torch.compile training (demo model) faster than eager, no recompile per call or per length", compiled),
        ]

    def small_batch(self, index) -> int:
        return list(_small_models().values())[index][3]

    def goals_table(self) -> list[str]:
        rows = []
        for text, fn in self.goals():
            outcome = fn()
            rows.append([text, "n/a" if outcome is None else outcome[1],
                         "n/a" if outcome is None else ("PASS" if outcome[0] else "MISS")])
        passed = sum(row[2] == "PASS" for row in rows)
        return (["## Goals (xlstm_hf, fp32)", "", f"{passed} of {len(rows)} pass.", ""]
                + self.table(["goal", "measured", "verdict"], rows) + [""])

    # ---- the extras ----
    def extras_tables(self) -> list[str]:
        lines = []
        names = list(_small_models())
        small_peers = [p for p in ("xlstm_hf", "official", "gpt2") if p in self.peers]
        if any(k[1] == "small" for k in self.results):
            lines += ["### Small models (the paper's synthetic-task scale): forward + backward, ms", "",
                      "Vocabulary 256, 4 heads, random weights; GPT-2 with one layer per xLSTM block at the same "
                      "width; no optimizer step; best of up to 5.", ""]
            rows = []
            for index, name in enumerate(names):
                blocks, width, layout, B, T = _small_models()[name]
                cells = []
                for p in small_peers:
                    r = self.results.get((p, "small", "fp32", B, index))
                    cells.append(f"{r['value']:.1f}" if r and r["status"] == "ok" else (r["reason"] if r else "-"))
                ups = [self.ratio("xlstm_hf", p, "small", "fp32", B, index) for p in small_peers[1:]]
                rows.append([name, str(B), str(T)] + cells + [f"{u:.2f}x" if u else "-" for u in ups])
            lines += self.table(["model", "batch", "T"] + [f"{p} ms" for p in small_peers]
                                + [f"xlstm_hf vs {p}" for p in small_peers[1:]], rows) + [""]
        lossmem = [r for k, r in self.results.items() if k[1] == "lossmem"]
        if lossmem:
            r = lossmem[0]
            lines += ["### Loss over a long document", ""]
            lines += ([f"Demo model, one no-grad forward with labels over {r['size']:,} tokens (skip_logits=True): "
                       f"peak RSS {r['value']:.2f} GiB, {r['seconds']:.1f} s; its fp32 logits alone would take "
                       f"{r['full_logits_gib']:.1f} GiB.", ""] if r["status"] == "ok" else [r["reason"], ""])
        comp = [r for k, r in self.results.items() if k[1] == "compile"]
        if comp:
            r = comp[0]
            lines += ["### torch.compile training", ""]
            if r["status"] == "ok":
                lines += [f"Demo model, B={r['batch']}, T={r['size']}, forward + backward + fused AdamW, "
                          "torch.compile(model) as Trainer(torch_compile=True) does it: "
                          f"eager {r['eager_tok_s']:.0f} tok/s, compiled {r['value']:.0f} tok/s "
                          f"({r['value'] / r['eager_tok_s']:.2f}x), compiling took {r['compile_seconds']:.0f} s; "
                          f"graphs compiled: {r['graphs'][0]} over {r['steps']} steps at T={r['size']}, "
                          f"{r['graphs'][1]} after T+8 (the recompile to dynamic shapes), {r['graphs'][2]} after "
                          f"T+16; graph breaks: {r['graph_breaks']}.", ""]
            else:
                lines += [r["reason"], ""]
        return lines

    # ---- the whole document ----
    def markdown(self) -> str:
        m, d = self.machine, self.data["machine"]
        lines = ["# CPU benchmark suite", ""]
        lines += [f"- CPU: {d['cpu']}, {d['logical_cores']} logical cores, torch threads: {d['threads']}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()),
                  f"- run: {self.data['started']}, {self.data['duration_s'] / 60:.1f} min"
                  + (" (--quick: tiny sizes, for checking the script only; one worker per peer and dtype, so "
                     "peak RSS is not per measurement)" if self.data["args"]["quick"] else ""),
                  f"- load average at start / end: {format_load(d.get('load_average_start'))} / "
                  f"{format_load(d.get('load_average_end'))}"
                  " (a busy machine disturbs every figure)"]
        if m:
            gflops = m["matmul_gflops"]
            lines += [f"- read bandwidth: {m['read_gbs']:.1f} GB/s (best of 5 torch.sum over a {m['buffer_mib']} MiB "
                      f"fp32 buffer; copy: {m['copy_gbs']:.1f} GB/s read+write) -- used for the decode bounds",
                      f"- matmul: {gflops['fp32']:.0f} GFLOP/s fp32, {gflops['bf16']:.0f} GFLOP/s bf16 (best square "
                      "torch.mm) -- used for the prefill and training bounds"]
        lines += ["", "## Peers", ""]
        rows = [[p, self.profiles[p]["title"], f"{self.profiles[p]['params_total'] / 1e6:.1f}M",
                 f"{self.profiles[p]['params_read_per_token'] / 1e6:.1f}M"] for p in self.peers if p in self.profiles]
        lines += self.table(["peer", "model", "parameters", "read per token"], rows) + [""]
        for p in self.peers:
            for note in self.profiles.get(p, {}).get("notes", []):
                lines.append(f"- {note}")
        notes = {(r["peer"], r["what"], r["dtype"], note) for r in self.results.values() for note in r.get("notes", [])}
        lines += [f"- {peer} {what} {dtype}: {note}" for peer, what, dtype, note in sorted(notes)]  # e.g. state check
        lines += ["- bf16: weights cast to bfloat16 for decode and prefill; training keeps fp32 master weights and "
                  "runs under torch.autocast('cpu', dtype=torch.bfloat16)",
                  "- all models have random weights; prompts are random GPT-2 token ids", ""]
        lines += self.goals_table()
        lines += ["## Figures", "",
                  "Cells: the measured figure, then its ratio to the bound (`bd`): decode time / bound time "
                  "(1.0x = at the bandwidth limit), prefill and training throughput as % of the matmul bound. "
                  "Bounds and methods: benchmarks/README.md.", ""]
        lines += self.figure_tables("decode", "Decode: ms per step (one new token for each of the batch's sequences)",
                                    "ms")
        lines += self.figure_tables("prefill", "Prefill: tokens/s (one forward over the prompt, last logits)", "tok/s")
        lines += self.figure_tables("train", "Training: tokens/s (forward + backward + AdamW)", "tok/s")
        lines += self.extras_tables()
        return "\n".join(lines) + "\n"

    # ---- plots ----
    def plot(self, what: str, path: Path, ylabel: str) -> None:
        """One panel per (dtype, batch): the figure against the size per peer, xlstm_hf's bound dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter

        sizes = self.sizes(what)
        combos = [(d, B) for d in self.dtypes for B in self.batches]
        if not sizes or not combos:
            return
        cols = min(2, len(combos))
        rows = (len(combos) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
        for ax, (dtype, B) in zip(axes.flat, combos):
            for peer in self.peers:
                points = [(T, r["value"]) for T in sizes if (r := self.get(peer, what, dtype, B, T))]
                if points:
                    ax.plot(*zip(*points), marker="o", label=peer)
                bounds = [(T, b) for T in sizes if (b := self.bound(self.get(peer, what, dtype, B, T)))]
                if peer == "xlstm_hf" and bounds:
                    ax.plot(*zip(*bounds), ls="--", color="gray", label="xlstm_hf bound")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sizes, [str(T) for T in sizes])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.set_title(f"{dtype}, batch {B}")
            ax.set_xlabel("context (tokens)" if what == "decode" else "prompt length T (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(combos):]:
            ax.axis("off")
        titles = {"decode": "Decode: ms per step vs context", "prefill": "Prefill: tokens/s vs prompt length"}
        fig.suptitle(titles[what])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def write_outputs(data: dict, s: Settings, out: Path) -> str:
    """cpu_suite.json (the records plus every bound), cpu_suite.md and the two plots; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    report = Report(data, s)
    data["bounds"] = {"/".join(map(str, key)): report.bound(r) for key, r in report.results.items() if report.bound(r)}
    (out / "cpu_suite.json").write_text(json.dumps(data, indent=1))
    text = report.markdown()
    (out / "cpu_suite.md").write_text(text)
    report.plot("decode", out / "decode_vs_context.png", "ms per step (lower is better)")
    report.plot("prefill", out / "prefill_vs_length.png", "tokens/s (higher is better)")
    return text


# ==================================================================================================
# CLI
# ==================================================================================================


def parse_args(argv=None):
    import torch

    from _peers import PEERS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (checks the script, ~3 min)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--what", default=",".join(WHATS), help="comma-separated subset of decode,prefill,train")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,8; with --quick 1,2)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all cores)")
    # worker mode (used by the suite itself; handy for a single measurement by hand)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.what = [x for x in args.what.split(",") if x]
    if args.batches is None:
        args.batches = ",".join(map(str, settings_for(args).batches))
    if args.worker:
        return args
    args.peers = [x for x in args.peers.split(",") if x]
    args.batches = [int(x) for x in args.batches.split(",") if x]
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    for name, values, allowed in (("--peers", args.peers, PEERS), ("--what", args.what, WHATS),
                                  ("--dtypes", args.dtypes, ("fp32", "bf16"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad}; choose from {list(allowed)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    s = settings_for(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.log_dir = tempfile.mkdtemp(prefix="cpu_suite_logs_")  # workers' stderr
    machine = machine_description(args)
    print(f"{machine['cpu']}, {machine['logical_cores']} cores, {args.threads} threads; "
          + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.time()
    results = run_all(args, s)
    machine["load_average_end"] = load_average()
    data = {"started": started, "duration_s": time.time() - t0, "machine": machine, "settings": asdict(s),
            "args": {k: getattr(args, k) for k in ("quick", "peers", "what", "batches", "dtypes", "threads")},
            "results": results}
    text = write_outputs(data, s, out)
    print(text)
    print(f"wrote {out / 'cpu_suite.md'}, cpu_suite.json, decode_vs_context.png, prefill_vs_length.png "
          f"(workers' stderr: {args.log_dir})")


if __name__ == "__main__":
    main()
