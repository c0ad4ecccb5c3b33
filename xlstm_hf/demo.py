"""The end-to-end demo: train a small xLSTM[7:1] on the bundled Shakespeare text, save, reload, generate.

    from xlstm_hf.demo import run_demo
    result = run_demo("xlstm-demo", minutes=3.0)

or `xlstm-hf demo` on the command line. Every step is the ordinary Hugging Face flow: an `xLSTMConfig`,
`xLSTMForCausalLM`, `save_pretrained`, `AutoModelForCausalLM.from_pretrained`, `generate` with a
`TextStreamer`. The training loop is plain PyTorch (AdamW, linear warmup then cosine decay, gradient
clipping) and runs for a wall-clock budget, so it fits any machine: the schedule is laid over the number of
steps the budget allows at the pace measured so far, and a machine too slow for a useful result in the
budget is told so, with a budget that would do.

Cost: with the GPT-2 vocabulary the LM head (256 x 50304) and its softmax take ~80% of a training step
on a CPU, whatever the batch shape, so throughput is ~650 tokens/s on 2 cores. For a fixed time budget,
small batches (8 x 64 tokens, ~1.3 steps/s there) reach a clearly lower validation loss than large ones
(16 x 128: 0.35 nats worse after the same ~95k tokens, having taken 4x fewer steps).

The text (Hamlet, Macbeth, The Tempest; public domain) is tokenised with the GPT-2 tokenizer shipped in
the package; the last 10% of the tokens are held out for validation.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from transformers import TextStreamer

from .configuration_xlstm import xLSTMConfig
from .modeling_xlstm import xLSTMForCausalLM
from .tokenization import load_gpt2_tokenizer

#: The bundled training text.
SHAKESPEARE_PATH = Path(__file__).resolve().parent / "data" / "shakespeare_valid.txt"

#: The demo model: xLSTM[7:1] with 8 blocks (block 4 is the sLSTM block), 256 wide, GPT-2 vocabulary
#: padded to 50304. The input embedding and the LM head are shared, which halves the parameter count
#: (~16M, of which 12.9M are the embedding).
DEMO_MODEL = dict(
    vocab_size=50304,
    hidden_size=256,
    num_blocks=8,
    slstm_at="7:1",
    mlstm_num_heads=4,
    slstm_num_heads=4,
    chunk_size=64,
    tie_word_embeddings=True,
)

DEFAULT_PROMPT = "HAMLET:\n"

#: Training steps the demo needs before its samples look like Shakespeare rather than noise (it takes the
#: validation loss from 11.0 to ~5.2 in 248 steps); a time budget that fits fewer gets a note saying so.
USEFUL_STEPS = 200

#: The clock of the time budget (a module attribute, so that tests can run a "slow machine" instantly).
clock = time.perf_counter


@dataclass
class DemoResult:
    """What `run_demo` did. Losses are mean next-token cross-entropies in nats on the validation split."""

    output_dir: str
    layout: str
    num_params: int
    train_tokens: int
    valid_tokens: int
    steps: int
    tokens_seen: int
    train_seconds: float
    val_loss_before: float
    val_loss_after: float
    generated_text: str

    @property
    def val_ppl_before(self) -> float:
        return math.exp(self.val_loss_before)

    @property
    def val_ppl_after(self) -> float:
        return math.exp(self.val_loss_after)

    def to_dict(self) -> dict:
        return {**asdict(self), "val_ppl_before": self.val_ppl_before, "val_ppl_after": self.val_ppl_after}


def demo_config(**overrides) -> xLSTMConfig:
    """The demo's model config (`DEMO_MODEL`), with `overrides` applied."""
    return xLSTMConfig(**{**DEMO_MODEL, **overrides})


def load_corpus(tokenizer, path: str | Path = SHAKESPEARE_PATH) -> torch.Tensor:
    """The bundled text as one 1-D tensor of token ids."""
    text = Path(path).read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def split_tokens(ids: torch.Tensor, valid_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid): the last `valid_fraction` of the tokens are the validation split."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    cut = int(len(ids) * (1 - valid_fraction))
    return ids[:cut], ids[cut:]


def random_batch(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` windows of `seq_len` tokens at random offsets. They serve as inputs and as labels (the
    model shifts the labels itself), so each window trains `seq_len - 1` predictions."""
    starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq_len: int = 128, batch_size: int = 16, max_windows: int | None = None,
             device: str | torch.device = "cpu") -> float:
    """Mean next-token loss over `ids`, cut into consecutive windows of `seq_len + 1` tokens overlapping by
    one, so every token after the first is predicted exactly once (within its window's context)."""
    n_windows = (len(ids) - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"need more than {seq_len} tokens to evaluate, got {len(ids)}")
    was_training = model.training
    model.eval()
    windows = torch.stack([ids[w * seq_len : (w + 1) * seq_len + 1] for w in range(n_windows)])
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def lr_at(step: int, total_steps: float, lr: float, warmup_steps: int, warmup_fraction: float = 0.1,
          min_lr_ratio: float = 0.1) -> float:
    """The learning rate of step `step` (from 0) of a run of `total_steps` steps: a linear warmup over the
    first `warmup_steps` steps, but over no more than `warmup_fraction` of the run (and at least one step),
    then a cosine decay that reaches `min_lr_ratio * lr` at the last step. `total_steps` may be an estimate
    (a float; `math.inf` while unknown)."""
    warmup = max(1, round(min(warmup_steps, warmup_fraction * total_steps)))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total_steps - warmup - 1, 1), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def planned_steps(step: int, elapsed: float, budget_s: float | None, max_steps: int | None) -> float:
    """The number of steps the run will take: `max_steps`, or, with a time budget of `budget_s` seconds, the
    steps that fit in it at the pace of the `step` steps done in `elapsed` seconds (`math.inf` before the
    first step), capped by `max_steps`."""
    if budget_s is None:
        return max_steps
    fit = budget_s * step / elapsed if step and elapsed > 0 else math.inf
    return fit if max_steps is None else min(fit, max_steps)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device (default: cuda when available, else cpu). Raises ValueError for a name
    torch does not know and for a GPU this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {str(device)!r} ({str(error).splitlines()[0]})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: torch finds no CUDA GPU on this machine")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} is not available: torch finds no Apple GPU (MPS) on this machine")
    return resolved


def useful_minutes(steps: int, minutes: float) -> int:
    """The whole minutes in which this machine, having run `steps` steps in `minutes`, would run `USEFUL_STEPS`."""
    return math.ceil(minutes * USEFUL_STEPS / max(steps, 1))


def train(model, train_ids: torch.Tensor, *, minutes: float | None, max_steps: int | None, batch_size: int,
          seq_len: int, lr: float, warmup_steps: int, weight_decay: float, grad_clip: float, seed: int,
          device: torch.device, progress: bool = True) -> tuple[int, int, float]:
    """The training loop. Stops when the wall-clock budget (`minutes`) or `max_steps` is used up, whichever
    comes first. The schedule (`lr_at`) spans the steps the run will take: `max_steps`, or as many as the
    time budget allows at the pace so far (`planned_steps`, re-estimated every step), so a slow machine
    still gets a short warmup and a full decay. Returns (steps, tokens seen, seconds)."""
    from tqdm.auto import tqdm

    if minutes is None and max_steps is None:
        raise ValueError("give a time budget (minutes) or max_steps")
    budget_s = None if minutes is None else minutes * 60.0
    # no weight decay on norms, biases and the (tied) embedding, as usual for language models
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    by_steps = budget_s is None
    bar = tqdm(
        total=max_steps if by_steps else round(budget_s), disable=not progress, dynamic_ncols=True,
        unit="step" if by_steps else "s", desc="training",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}" + ("" if by_steps else "s") + "{postfix}",
    )
    model.train()
    step = tokens = 0
    smoothed = None
    elapsed = 0.0
    start = clock()
    try:
        while (budget_s is None or elapsed < budget_s) and (max_steps is None or step < max_steps):
            rate = lr_at(step, planned_steps(step, elapsed, budget_s, max_steps), lr, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = rate
            batch = random_batch(train_ids, batch_size, seq_len, generator).to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            step += 1
            tokens += batch_size * seq_len
            loss_value = loss.item()
            smoothed = loss_value if smoothed is None else 0.9 * smoothed + 0.1 * loss_value
            elapsed = clock() - start
            bar.n = step if by_steps else min(elapsed, budget_s)
            bar.set_postfix_str(
                f"step {step}, loss {smoothed:.3f}, {tokens / max(elapsed, 1e-9):,.0f} tok/s, "
                f"lr {optimizer.param_groups[0]['lr']:.1e}",
                refresh=True,
            )
    finally:
        bar.close()
    return step, tokens, elapsed


class PrintStreamer(TextStreamer):
    """`TextStreamer` that prints to `out` (default: the current `sys.stdout`) instead of always to stdout."""

    def __init__(self, tokenizer, out: TextIO | None = None, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False):
        print(text, flush=True, end="" if not stream_end else None, file=self.out or sys.stdout)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 200, do_sample: bool = True,
                  temperature: float = 0.8, top_k: int = 40, seed: int = 0, stream: bool = True,
                  out: TextIO | None = None) -> str:
    """Continue `prompt`; with `stream`, the text (prompt first) is printed to `out` as it is generated
    (by a `TextStreamer`). Returns the continuation (without the prompt)."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError("the prompt is empty")
    streamer = PrintStreamer(tokenizer, out) if stream else None
    torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k) if do_sample else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **kwargs,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_demo(
    output_dir: str | Path = "xlstm-demo",
    minutes: float | None = 3.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 40,
    max_steps: int | None = None,
    batch_size: int = 8,
    seq_len: int = 64,
    lr: float = 3e-3,
    warmup_steps: int = 20,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    valid_fraction: float = 0.1,
    eval_windows: int | None = None,
    model_overrides: dict | None = None,
    progress: bool = True,
    stream: bool = True,
    out: TextIO | None = None,
) -> DemoResult:
    """Train a small xLSTM[7:1] on the bundled text, save it with its tokenizer into `output_dir`, reload it
    with the Auto classes and stream a sampled continuation of `prompt`. Prints progress and a summary.

    Training runs for `minutes` of wall-clock time and/or `max_steps` steps (whichever ends first; give
    `minutes=None` and `max_steps` for a run whose result depends only on `seed`). `model_overrides` change
    the model config (e.g. `dict(hidden_size=64, num_blocks=2)` for a tiny model in tests);
    `eval_windows` caps the number of validation windows evaluated (None: the whole split).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = out if out is not None else sys.stdout
    say = lambda *args: print(*args, file=out, flush=True)  # noqa: E731
    device = resolve_device(device)
    output_dir = Path(output_dir)
    torch.manual_seed(seed)

    tokenizer = load_gpt2_tokenizer()
    train_ids, valid_ids = split_tokens(load_corpus(tokenizer), valid_fraction)
    config = demo_config(**(model_overrides or {}))
    model = xLSTMForCausalLM(config).to(device)
    num_params = model.num_parameters()
    budget = " and ".join(([f"{minutes:g} min"] if minutes is not None else []) +
                          ([f"{max_steps} steps"] if max_steps is not None else []))
    say(f"xLSTM demo: {config.layout} with {config.num_blocks} blocks (sLSTM at {config.slstm_at}), hidden "
        f"{config.hidden_size}, {num_params / 1e6:.1f}M parameters, on {device}")
    say(f"data: {SHAKESPEARE_PATH.name}, {len(train_ids):,} training / {len(valid_ids):,} validation tokens; "
        f"batches of {batch_size} x {seq_len} tokens; training for {budget}")

    eval_kw = dict(seq_len=seq_len, batch_size=batch_size, max_windows=eval_windows, device=device)
    val_before = evaluate(model, valid_ids, **eval_kw)
    say(f"validation loss before training: {val_before:.3f} (perplexity {math.exp(val_before):,.0f})")

    steps, tokens_seen, seconds = train(
        model, train_ids, minutes=minutes, max_steps=max_steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, device=device,
        progress=progress,
    )
    val_after = evaluate(model, valid_ids, **eval_kw)
    say(f"trained {steps} steps ({tokens_seen:,} tokens) in {seconds:.0f} s, "
        f"{tokens_seen / max(seconds, 1e-9):,.0f} tokens/s")
    say(f"validation loss after training: {val_after:.3f} (perplexity {math.exp(val_after):,.1f})")
    # the time budget (not max_steps) ended the run before the model could learn much: say so before the sample
    too_slow = minutes is not None and (max_steps is None or steps < max_steps) and steps < USEFUL_STEPS
    if too_slow:
        say(f"note: only {steps} training steps fit in {minutes:g} min on this machine; the demo needs about "
            f"{USEFUL_STEPS} before its text looks like Shakespeare, so expect noise below. "
            f"Try `xlstm-hf demo --minutes {useful_minutes(steps, minutes)}`.")

    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    del model

    # Reload exactly as a user would.
    model = AutoModelForCausalLM.from_pretrained(output_dir).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    say(f"reloaded {type(model).__name__} from {output_dir}; sampling (temperature {temperature}, top_k {top_k}):")
    say("-" * 60)
    text = generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, seed=seed, stream=stream, out=out)
    if stream:
        say("-" * 60)

    result = DemoResult(
        output_dir=str(output_dir), layout=config.layout, num_params=num_params, train_tokens=len(train_ids),
        valid_tokens=len(valid_ids), steps=steps, tokens_seen=tokens_seen, train_seconds=seconds,
        val_loss_before=val_before, val_loss_after=val_after, generated_text=text,
    )
    say("summary:")
    say(f"  model       {config.layout}, {config.num_blocks} blocks, hidden {config.hidden_size}, "
        f"{num_params / 1e6:.1f}M parameters")
    say(f"  training    {steps} steps, {tokens_seen:,} tokens, {seconds:.0f} s on {device}")
    say(f"  validation  loss {val_before:.3f} -> {val_after:.3f}, perplexity {result.val_ppl_before:,.0f} -> "
        f"{result.val_ppl_after:,.1f}")
    say(f"  saved to    {output_dir.resolve()}")
    if too_slow:
        say(f"  try         xlstm-hf demo --minutes {useful_minutes(steps, minutes)} "
            f"(only {steps} steps fit in {minutes:g} min here)")
    else:
        say(f"  try         xlstm-hf generate --model {output_dir} --prompt 'ROMEO:'")
    return result


__all__ = ["DemoResult", "PrintStreamer", "demo_config", "evaluate", "generate_text", "load_corpus", "lr_at",
           "planned_steps", "run_demo", "split_tokens"]
