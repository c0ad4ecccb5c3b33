"""Multi-process training for real: examples/ddp_train.py on 2 CPU processes (gloo) against 1 process.

Both runs use the same global batch (8 sequences per step: 8 on one process, 4 + 4 on two), the same data in the
same order and plain SGD, so they take the same steps. The only difference is floating-point summation order: DDP
averages two 4-sequence gradients with an all-reduce where the single process reduces over all 8 sequences at once.
That changes gradients by a few fp32 ulps (relative ~1e-7..1e-6). With lr 0.5, gradients clipped to norm 1 and 5
steps, weights can move apart by at most ~5 * 0.5 * 1e-6 relative to the gradient scale; we allow
|w_ddp - w_single| <= 1e-6 + 1e-6 |w_single| (measured: ~1.2e-7, one ulp at |w| ~ 1). The two ranks apply the
same all-reduced gradient to the same weights, so their weights must be bitwise identical.

AdamW is not used for the comparison on purpose: it divides by sqrt(v), so a gradient that is ~0 up to rounding
(e.g. the sLSTM forget-gate bias entries initialised at +7, where the sigmoid is saturated) becomes an update of
about +-lr whose sign depends on that rounding (measured: 5e-4 max difference with lr 3e-3).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "ddp_train.py"
BIN = Path(sys.executable).parent
# the console scripts of this environment, or the modules behind them
TORCHRUN = [BIN / "torchrun"] if (BIN / "torchrun").exists() else [sys.executable, "-m", "torch.distributed.run"]
ACCELERATE = ([BIN / "accelerate"] if (BIN / "accelerate").exists()
              else [sys.executable, "-m", "accelerate.commands.accelerate_cli"])
STEPS, GLOBAL_BATCH = 5, 8
RTOL = ATOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def start(cmd: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited with {proc.returncode}:\n{out[-4000:]}"
    return out


def train_args(out_dir: Path, *extra) -> list:
    return [SCRIPT, "--output-dir", out_dir, "--max-steps", STEPS, "--global-batch-size", GLOBAL_BATCH, *extra]


def torchrun(out_dir: Path, *extra) -> list:
    return [*TORCHRUN, "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", free_port(),
            *train_args(out_dir, *extra)]


def load_run(out_dir: Path) -> tuple[dict, list]:
    summary = json.loads((out_dir / "summary.json").read_text())
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(summary["world_size"])]
    return summary, ranks


def initial_weights() -> dict:
    """The weights the example starts from (it builds its model after `set_seed(0)`)."""
    from transformers import set_seed

    from xlstm_hf import xLSTMForCausalLM

    spec = importlib.util.spec_from_file_location("ddp_train", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    set_seed(0)
    return xLSTMForCausalLM(example.tiny_config()).state_dict()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_training(single: dict, multi: dict):
    for name in single:
        torch.testing.assert_close(multi[name], single[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and one torchrun run with 2 processes, started concurrently."""
    root = tmp_path_factory.mktemp("ddp")
    single = start([sys.executable, *train_args(root / "single")], root)
    ddp = start(torchrun(root / "ddp"), root)
    outputs = finish(single), finish(ddp)
    return root, outputs


def test_single_process_run(runs):
    root, _ = runs
    summary, ranks = load_run(root / "single")
    assert summary["world_size"] == 1 and summary["per_device_train_batch_size"] == GLOBAL_BATCH
    assert summary["distributed_type"] == "DistributedType.NO"
    assert len(summary["losses"]) == STEPS and summary["losses"][-1] < summary["losses"][0]
    assert len(ranks) == 1


def test_torchrun_two_processes_match_single_process(runs):
    root, _ = runs
    single_summary, (single,) = load_run(root / "single")
    summary, (rank0, rank1) = load_run(root / "ddp")
    assert summary["world_size"] == 2 and summary["per_device_train_batch_size"] == GLOBAL_BATCH // 2
    assert summary["distributed_type"] == "DistributedType.MULTI_CPU"
    # both ranks hold the very same weights after training
    assert max_abs_diff(rank0, rank1) == 0.0
    # and they are the single-process weights up to summation order
    print(f"\nDDP vs single process: max |dw| = {max_abs_diff(rank0, single):.3g}")
    assert_same_training(single, rank0)
    # the logged loss is the mean over both ranks, i.e. the global-batch loss
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(single_summary["losses"]),
                               rtol=1e-5, atol=0)
    # and the training did move the weights, by far more than the tolerance
    assert max_abs_diff(initial_weights(), single) > 1e-3


def test_ddp_save_pretrained_holds_the_trained_weights(runs):
    from transformers import AutoModelForCausalLM

    root, _ = runs
    _, (rank0, _) = load_run(root / "ddp")
    loaded = AutoModelForCausalLM.from_pretrained(root / "ddp")
    state = loaded.state_dict()
    assert state.keys() == rank0.keys()
    assert max_abs_diff(state, rank0) == 0.0


def accelerate_config(path: Path) -> Path:
    # accelerate 1.15: distributed_type MULTI_GPU starts the processes through torch.distributed.run (like torchrun);
    # the script's TrainingArguments(use_cpu=True) then makes it a MULTI_CPU run on gloo. distributed_type
    # MULTI_CPU (or `accelerate launch --cpu --num_processes 2`) would start ONE process unless mpirun is set up.
    path.write_text(textwrap.dedent(f"""\
        compute_environment: LOCAL_MACHINE
        distributed_type: MULTI_GPU
        num_machines: 1
        num_processes: 2
        main_process_ip: 127.0.0.1
        main_process_port: {free_port()}
        mixed_precision: 'no'
        dynamo_config: {{}}
        """))
    return path


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_match_single_process(runs):
    root, _ = runs
    config = accelerate_config(root / "accelerate.yaml")
    finish(start([*ACCELERATE, "launch", "--config_file", config, *train_args(root / "accelerate")], root))
    _, (single,) = load_run(root / "single")
    summary, (rank0, rank1) = load_run(root / "accelerate")
    assert summary["world_size"] == 2 and summary["distributed_type"] == "DistributedType.MULTI_CPU"
    assert max_abs_diff(rank0, rank1) == 0.0
    assert_same_training(single, rank0)


@pytest.mark.slow
def test_accelerate_launch_cpu_flag_starts_one_process(runs):
    """Documents accelerate 1.15: `--cpu --num_processes 2` silently runs a single process (the simple launcher;
    multi-CPU needs mpirun). Our script then trains alone with the full global batch."""
    root, _ = runs
    finish(start([*ACCELERATE, "launch", "--cpu", "--num_processes", 2, "--num_machines", 1,
                  "--mixed_precision", "no", "--dynamo_backend", "no", *train_args(root / "accelerate-cpu")], root))
    summary, _ = load_run(root / "accelerate-cpu")
    assert summary["world_size"] == 1


@pytest.mark.slow
def test_trainer_fsdp_on_cpu(runs):
    """Trainer(fsdp=True) on 2 CPU processes. With accelerate 1.15 FSDP is only switched on for GPU-like devices:
    with use_cpu=True the run is MULTI_CPU, the FSDP plugin is dropped and training is plain DDP (no error; the
    script warns). Whatever accelerate does, the result must be the single-process training."""
    root, _ = runs
    out = finish(start(torchrun(root / "fsdp", "--fsdp"), root))
    _, (single,) = load_run(root / "single")
    summary, (rank0, rank1) = load_run(root / "fsdp")
    if not summary["fsdp_enabled"]:
        assert "FSDP was requested but accelerate did not enable it" in out
    assert max_abs_diff(rank0, rank1) == 0.0
    assert_same_training(single, rank0)


FSDP2_LOOP = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, {examples!r})
from ddp_train import ArithmeticSequences, full_state_dict, tiny_config
from transformers import set_seed
from xlstm_hf import xLSTMForCausalLM

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
set_seed(0)
model = xLSTMForCausalLM(tiny_config())
for block in model.backbone.blocks:
    fully_shard(block)
fully_shard(model)
assert all(hasattr(p, "full_tensor") for p in model.parameters())  # DTensor shards
data = ArithmeticSequences({steps} * {batch}, 32, model.config.vocab_size, seed=1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
per_rank = {batch} // world
for step in range({steps}):
    ids = data.ids[step * {batch}:(step + 1) * {batch}][rank * per_rank:(rank + 1) * per_rank]
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
torch.save(full_state_dict(model), f"{out}/rank{{rank}}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_fully_shard_on_cpu_matches_single_process(runs):
    """FSDP2 itself works on CPU with gloo: `fully_shard` per block, the same SGD steps as the Trainer run."""
    root, _ = runs
    out_dir = root / "fsdp2"
    out_dir.mkdir()
    script = root / "fsdp2_loop.py"
    script.write_text(FSDP2_LOOP.format(examples=str(SCRIPT.parent), steps=STEPS, batch=GLOBAL_BATCH, out=str(out_dir)))
    finish(start([*TORCHRUN, "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", free_port(),
                  script], root))
    _, (single,) = load_run(root / "single")
    rank0, rank1 = (torch.load(out_dir / f"rank{r}.pt") for r in range(2))
    assert max_abs_diff(rank0, rank1) == 0.0
    assert_same_training(single, rank0)
