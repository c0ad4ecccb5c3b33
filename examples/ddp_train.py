"""Train a tiny xLSTM with `Trainer` on one process or several (DDP), reproducibly.

Everything is deterministic: the model is built from a fixed seed, the data are synthetic token sequences
drawn from a seeded generator, batches are taken in order (`train_sampling_strategy="sequential"`), and the
global batch size is fixed, so each of the W processes gets `global_batch_size / W` sequences per step. One
process and W processes therefore take the same optimisation steps up to floating-point summation order,
which is what tests/test_distributed.py checks.

    # one process
    python examples/ddp_train.py --output-dir out-single
    # two CPU processes (gloo backend)
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/ddp_train.py --output-dir out-ddp
    # through accelerate (1.15): a config file with `distributed_type: MULTI_GPU` and `num_processes: 2`
    # starts 2 processes also on a CPU-only machine (`--cpu` / MULTI_CPU start only one; see README)
    accelerate launch --config_file two_procs.yaml examples/ddp_train.py --output-dir out-acc

Without CUDA GPUs (or with `--cpu`) the script trains on CPU with gloo, else accelerate's GPU defaults apply.
`--fsdp` asks Trainer for FSDP (full shard, one unit per block); on CPU accelerate 1.15 does not enable it
and the run is plain DDP (the script says so).

Output in `--output-dir`: `config.json` + `model.safetensors` (the final model, `save_pretrained` by rank 0),
`rank{r}.pt` (each rank's own final parameters, as a state dict of full tensors) and `summary.json` (world
size, batch sizes, distributed type and the logged losses, written by rank 0).
"""

import argparse
import json
import os
import sys

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, set_seed

import xlstm_hf  # noqa: F401  (registers the Auto classes)
from xlstm_hf import xLSTMConfig, xLSTMForCausalLM


class ArithmeticSequences(Dataset):
    """Sequences (start + step * t) mod vocab with start and step drawn from a seeded generator.

    A small language model learns these quickly (the next token follows from the last two), so the loss
    visibly falls in a few steps. Items are dicts of `input_ids` and `labels` (the model shifts labels).
    """

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab_size, (num_samples, 1), generator=gen)
        step = torch.randint(1, 8, (num_samples, 1), generator=gen)
        self.ids = (start + step * torch.arange(seq_len)) % vocab_size

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_config() -> xLSTMConfig:
    """xLSTM[3:1]: 4 blocks (block 1 an sLSTM block), 32 wide, 97-token vocabulary; 41k parameters."""
    return xLSTMConfig(vocab_size=97, hidden_size=32, num_blocks=4, slstm_at=[1], mlstm_num_heads=2,
                       slstm_num_heads=2, chunk_size=8, dropout=0.0, bos_token_id=0, eos_token_id=None,
                       pad_token_id=0)


def full_state_dict(model: torch.nn.Module) -> dict:
    """This process's parameters as plain full tensors (FSDP2 holds DTensor shards; gather them)."""
    out = {}
    for name, t in model.state_dict().items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.detach().clone().cpu()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--global-batch-size", type=int, default=8, help="sequences per optimiser step, all processes")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--optim", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default: 0.5 for sgd, 3e-3 for adamw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on CPU even if CUDA GPUs are available (default: CPU "
                   "only when there is no GPU)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (full shard, one unit per block)")
    p.add_argument("--fsdp-version", type=int, default=2, choices=[1, 2], help="2: fully_shard (FSDP2), 1: legacy")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.global_batch_size % world_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by {world_size} processes")
    per_device = args.global_batch_size // world_size

    set_seed(args.seed)
    model = xLSTMForCausalLM(tiny_config())  # same seed on every rank -> same init (DDP also broadcasts rank 0's)
    data = ArithmeticSequences(args.global_batch_size * args.max_steps, args.seq_len, model.config.vocab_size,
                               seed=args.seed + 1)

    fsdp_kwargs = {}
    if args.fsdp:
        fsdp_kwargs = dict(fsdp=True, fsdp_config={
            "version": args.fsdp_version,
            "reshard_after_forward": True if args.fsdp_version == 2 else "full_shard",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["mLSTMBlock", "sLSTMBlock"],
        })
    use_cpu = args.cpu or not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        # Without use_cpu=True on a machine without GPUs, every launched process would train on its own
        # (ParallelMode.NOT_PARALLEL, only a warning): the check below catches that.
        use_cpu=use_cpu,
        # gloo is torch.distributed's CPU backend (on GPUs accelerate picks nccl). Only when distributed: with a
        # single process, accelerate 1.15 still calls torch.distributed.get_world_size() for an explicit backend
        # and fails with "Default process group has not been initialized".
        ddp_backend="gloo" if use_cpu and world_size > 1 else None,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        max_steps=args.max_steps,
        train_sampling_strategy="sequential",  # no shuffling: batch k is sequences [k*G, (k+1)*G) on any W
        optim="sgd" if args.optim == "sgd" else "adamw_torch",
        learning_rate=args.lr if args.lr is not None else (0.5 if args.optim == "sgd" else 3e-3),
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **fsdp_kwargs,
    )
    if training_args.world_size != world_size:  # e.g. a launcher that starts processes without a process group
        raise SystemExit(f"{world_size} processes were launched but Trainer sees a world of "
                         f"{training_args.world_size} ({training_args.parallel_mode}); use torchrun or see README")
    trainer = Trainer(model=model, args=training_args, train_dataset=data)
    if args.fsdp and not trainer.is_fsdp_enabled and trainer.is_world_process_zero():
        # accelerate 1.15 turns FSDP on only for GPU-like devices; with use_cpu=True the run is MULTI_CPU and the
        # FSDP plugin is dropped (FSDP2 itself, torch.distributed.fsdp.fully_shard, does work on CPU with gloo)
        print(f"warning: FSDP was requested but accelerate did not enable it on {trainer.accelerator.distributed_type};"
              " training with plain DDP", file=sys.stderr)
    trainer.train()

    os.makedirs(args.output_dir, exist_ok=True)
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2 turns parameters into DTensors
    state = full_state_dict(model)  # collective for FSDP: every rank takes part
    torch.save(state, os.path.join(args.output_dir, f"rank{rank}.pt"))
    trainer.save_model(args.output_dir)  # save_pretrained on the main process (gathers FSDP shards)
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        summary = dict(world_size=world_size, per_device_train_batch_size=per_device,
                       global_batch_size=args.global_batch_size, max_steps=args.max_steps, optim=args.optim,
                       distributed_type=str(trainer.accelerator.distributed_type),
                       fsdp_enabled=trainer.is_fsdp_enabled, sharded_parameters=sharded,
                       losses=losses)
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
