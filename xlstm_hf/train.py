"""Train or fine-tune an xLSTM with the Hugging Face `Trainer` on local text files.

    from xlstm_hf.train import train
    result = train("my_texts/", "xlstm-finetuned", max_steps=200)            # a new small xLSTM[7:1]
    result = train("more.txt", "xlstm-more", model="xlstm-finetuned", lr=3e-4)  # continue a saved model
    print(result.eval_loss_before, result.eval_loss_after, result.eval_ppl_after)

or `xlstm-hf train my_texts/ --output-dir xlstm-finetuned` on the command line.

`text_dataset` turns text files into a `datasets.DatasetDict` of fixed-length blocks ("train" and
"validation"), the usual causal-LM recipe: every file is one document, tokenised, followed by the
end-of-text token; all documents are concatenated and cut into blocks of `block_size` tokens (the tail
that does not fill a block is dropped); a seeded random `eval_fraction` of the blocks is held out.
`train` is a thin wrapper around `transformers.Trainer` / `TrainingArguments`: it evaluates before
training (`eval_on_start`), every `eval_steps` during it and at the end, and saves the final model and its tokenizer to
`output_dir`. Everything is local; nothing is downloaded.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from transformers import Trainer, TrainerCallback

from .tokenization import load_gpt2_tokenizer

# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def text_files(paths) -> list[Path]:
    """The text files named by `paths`: a file, a folder (its `*.txt` files, sorted by name, not
    recursive) or a list of both. Raises FileNotFoundError for a missing path or a folder without .txt
    files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no text files given")
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.glob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"no .txt files in folder {entry}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {entry}")
    return files


def check_vocab(tokenizer, config) -> None:
    """Raise ValueError when the tokenizer can produce ids the model has no embedding for."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary (config.vocab_size) has only "
            f"{config.vocab_size}; use the model's own tokenizer or a model with vocab_size >= {len(tokenizer)}"
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def cut_pieces(documents, block_size: int) -> list[tuple[int, list[int]]]:
    """(document index, piece) for the consecutive pieces of at most `block_size` tokens of every document, in
    order, leaving out single-token pieces (they predict nothing)."""
    return [(n, piece) for n, doc in enumerate(documents) for start in range(0, len(doc), block_size)
            if len(piece := list(doc[start:start + block_size])) >= 2]


def pack_documents(documents, block_size: int, pad_token_id: int = 0):
    """Pack tokenised documents into rows of `block_size` tokens for padding-free training with exact resets.

    documents: lists of token ids (any lengths). A document longer than a block is cut into consecutive
    pieces of `block_size` tokens (its last piece shorter); every piece is trained as a document of its own,
    from a zero state (as blocks cut from a token stream are). Pieces are packed into rows best-fit
    decreasing (longest first, each into the fullest row that still has room), which leaves little of a row
    empty; the rest of a row is padding (attention_mask 0, labels -100).

    Returns a `datasets.Dataset` with `input_ids`, `attention_mask`, `position_ids` (restarting at 0 at every
    piece: where the model resets every recurrent state) and `labels` (the ids, with -100 at each piece's
    first token, which nothing in its row may predict, and at padding), each of `block_size` per row.
    """
    from datasets import Dataset

    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one next-token prediction), got {block_size}")
    pieces = sorted((piece for _, piece in cut_pieces(documents, block_size)), key=len, reverse=True)  # (stable)
    rows: list[list[list[int]]] = []
    free: list[tuple[int, int]] = []  # (room left, row) of every row, sorted
    for piece in pieces:
        at = bisect.bisect_left(free, (len(piece), -1))  # the fullest row that still has room (best fit)
        if at == len(free):
            rows.append([])
            room, row = block_size, len(rows) - 1
        else:
            room, row = free.pop(at)
        rows[row].append(piece)
        if room > len(piece):
            bisect.insort(free, (room - len(piece), row))
    columns = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": []}
    for row in rows:
        ids = [token for piece in row for token in piece]
        free = block_size - len(ids)
        columns["input_ids"].append(ids + [pad_token_id] * free)
        columns["attention_mask"].append([1] * len(ids) + [0] * free)
        columns["position_ids"].append([p for piece in row for p in range(len(piece))] + [0] * free)
        columns["labels"].append([-100 if p == 0 else t for piece in row for p, t in enumerate(piece)] + [-100] * free)
    return Dataset.from_dict(columns)


def text_dataset(paths, tokenizer, block_size: int, eval_fraction: float = 0.1, seed: int = 0, packing: bool = False,
                 streams: tuple[int, int] | None = None):
    """A `datasets.DatasetDict` with "train" and "validation" splits of `block_size`-token blocks.

    Each row has `input_ids` and `labels` (the same ids: causal LM models shift the labels themselves).
    Every file is one document: tokenised, then followed by the tokenizer's eos token (when it has one),
    so the model learns where documents end and is told that the next one is unrelated. The documents
    are concatenated and cut into consecutive blocks; the last partial block is dropped. A random
    `eval_fraction` of the blocks (at least one when `eval_fraction > 0`), chosen with `seed`, is the
    validation split; with `eval_fraction=0` the validation split is empty.

    `packing=True`: documents do not run into each other. Each document is cut into pieces of at most
    `block_size` tokens (nothing is dropped), a random `eval_fraction` of the pieces is held out, and each
    split's pieces are packed into rows by `pack_documents`, with position_ids that make the model reset
    its state at every piece.

    `streams=(rows, accumulation)`: for training with a carried state (`StatefulTrainer`). The pieces are cut
    and held out as with packing (the validation split is packed rows); what remains of each document (its
    runs of consecutive training pieces) is laid out by `stream_segments` in segments of `block_size`, and
    a document longer than a fair share of a stream is cut so that the rows * accumulation streams are about
    equally long.
    """
    from datasets import Dataset, DatasetDict
    from transformers.utils import logging as hf_logging

    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one next-token prediction), got {block_size}")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    files = text_files(paths)
    texts = [_read_text(path) for path in files]
    names = ", ".join(str(path) for path in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    if not any(texts):  # said before any progress bar
        raise ValueError(f"no text to train on: {names} {'is' if len(files) == 1 else 'are'} empty")
    documents = Dataset.from_dict({"text": texts})
    # `map` would otherwise fingerprint its functions by pickling them, tokenizer included (~1 s); these
    # in-memory datasets are never cached, so a fingerprint of the inputs is all it needs.
    key = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    key += [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), block_size]
    fingerprint = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"])["input_ids"]
        return {"input_ids": [doc + [eos] if doc and eos is not None else doc for doc in ids]}

    def group_texts(batch):
        ids = [token for doc in batch["input_ids"] for token in doc]
        usable = len(ids) // block_size * block_size
        blocks = [ids[start : start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    # Whole documents are longer than the tokenizer's model_max_length; that is expected before blocking.
    tokenizer_logger = hf_logging.get_logger("transformers.tokenization_utils_base")
    level = tokenizer_logger.level
    tokenizer_logger.setLevel(hf_logging.ERROR)
    try:
        tokenized = documents.map(tokenize, batched=True, remove_columns=["text"], desc="tokenising",
                                  new_fingerprint=f"{fingerprint}-tokens")
    finally:
        tokenizer_logger.setLevel(level)
    num_tokens = sum(len(ids) for ids in tokenized["input_ids"])
    if num_tokens == 0:
        raise ValueError(f"no text to train on: {names} {'is' if len(files) == 1 else 'are'} empty")
    if packing or streams:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        return _packed_splits(tokenized["input_ids"], block_size, eval_fraction, seed, names, pad, streams)
    # The block count is known from the token count: too little text is said before the grouping runs.
    num_blocks = num_tokens // block_size
    if num_blocks == 0:
        raise ValueError(f"{names}: {num_tokens} tokens are fewer than one block of {block_size} tokens; "
                         f"use more text or a smaller block size")
    num_eval = max(1, round(num_blocks * eval_fraction)) if eval_fraction > 0 else 0
    if num_eval >= num_blocks:
        raise ValueError(f"{names}: {num_tokens} tokens make only {num_blocks} block(s) of {block_size}, too few to "
                         f"hold out {eval_fraction:.0%} for validation; use more text, a smaller block size or "
                         f"eval_fraction=0")
    # One map call over all documents (batch_size=None; map's default would group each 1,000 documents on
    # their own and drop a partial block at every such batch's end), so only the very last partial block is
    # dropped.
    blocks = tokenized.map(group_texts, batched=True, batch_size=None, desc=f"grouping into blocks of {block_size}",
                           new_fingerprint=f"{fingerprint}-blocks")
    if num_eval == 0:
        return DatasetDict(train=blocks, validation=blocks.select([]))
    split = blocks.train_test_split(test_size=num_eval, shuffle=True, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


def _packed_splits(documents, block_size, eval_fraction, seed, names, pad_token_id, streams=None):
    """text_dataset's packed "train" and "validation" splits: the documents' pieces, split at random, packed
    (with `streams`, the training pieces as stream segments instead)."""
    from datasets import DatasetDict

    cut = cut_pieces(documents, block_size)
    owner, pieces = [n for n, _ in cut], [piece for _, piece in cut]
    num_eval = max(1, round(len(pieces) * eval_fraction)) if eval_fraction > 0 else 0
    if num_eval >= len(pieces):
        raise ValueError(f"{names}: {sum(map(len, documents))} tokens make only {len(pieces)} piece(s) of up to "
                         f"{block_size} tokens, too few to hold out {eval_fraction:.0%} for validation; use more "
                         "text, a smaller block size or eval_fraction=0")
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:num_eval])
    train = [p for n, p in enumerate(pieces) if n not in held_out]
    validation = [p for n, p in enumerate(pieces) if n in held_out]
    if streams:  # the runs of consecutive training pieces of each document, cut to fair shares of the streams
        runs, last = [], None
        for n, (piece, doc) in enumerate(zip(pieces, owner)):
            if n in held_out:
                last = None
                continue
            if last != doc:
                runs.append([])
            runs[-1] += piece
            last = doc
        rows, accumulation = streams
        share = -(-sum(map(len, runs)) // (rows * accumulation))
        runs = [run[start:start + share] for run in runs for start in range(0, len(run), share)]
        packed = DatasetDict(train=stream_segments(runs, rows, block_size, accumulation, pad_token_id))
    else:
        packed = DatasetDict(train=pack_documents(train, block_size, pad_token_id))
    no_rows = packed["train"].select([])
    packed["validation"] = pack_documents(validation, block_size, pad_token_id) if validation else no_rows
    return packed


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class MatrixDecayTrainer(Trainer):
    """`Trainer` that applies weight decay to weight matrices (and embeddings) only.

    Trainer exempts parameters of `nn.LayerNorm` modules and names matching "bias" or "norm" patterns
    (`.norm.`, `_norm.`), which covers every norm of the xLSTM but not the mLSTM's per-feature
    `learnable_skip` (initialised to 1, which that rule would decay towards 0; the official package
    exempts it). Here every parameter with fewer than two dimensions (norm scales, biases, skip
    weights) is exempt.
    """

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name, p in model.named_parameters() if p.dim() >= 2]


class _SayEvalBeforeTraining(TrainerCallback):
    """Prints the validation loss of the evaluation that `eval_on_start` runs before the first step."""

    def __init__(self, out: TextIO):
        self.out = out

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == 0 and metrics and "eval_loss" in metrics:
            from tqdm.auto import tqdm

            loss = metrics["eval_loss"]
            # tqdm.write: the line goes above the progress bar that is already showing
            tqdm.write(f"validation loss before training: {loss:.3f} (perplexity {format_perplexity(loss)})",
                       file=self.out)


class _EvalTime(TrainerCallback):
    """Adds up the time of this run's evaluations (not those of a resumed run's history)."""

    seconds = 0.0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seconds += (metrics or {}).get("eval_runtime", 0.0)


@dataclass
class TrainResult:
    """What `train` did. Losses are mean next-token cross-entropies in nats; steps are optimizer steps."""

    output_dir: str
    model_description: str
    num_params: int
    train_blocks: int
    eval_blocks: int
    block_size: int
    steps: int
    epochs: float
    train_seconds: float
    train_loss: float  # Trainer's average over the whole run
    train_tokens: int = 0  # real (not padding) input tokens trained on
    eval_seconds: float = 0.0  # of train_seconds, the time spent evaluating
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) as logged
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss); step 0 = before
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None

    @property
    def tokens_per_second(self) -> float:
        """Real input tokens trained on per second of training (padding and the evaluations' time excluded)."""
        seconds = self.train_seconds - self.eval_seconds
        return self.train_tokens / seconds if seconds > 0 else 0.0

    @property
    def eval_ppl_before(self) -> float | None:
        return None if self.eval_loss_before is None else math.exp(self.eval_loss_before)

    @property
    def eval_ppl_after(self) -> float | None:
        return None if self.eval_loss_after is None else math.exp(self.eval_loss_after)

    def to_dict(self) -> dict:
        return {**asdict(self), "eval_ppl_before": self.eval_ppl_before, "eval_ppl_after": self.eval_ppl_after,
                "tokens_per_second": self.tokens_per_second}


def data_kind(train_data, carry_state: bool = False) -> str:
    """What the training rows are, for messages."""
    if carry_state:
        return "segments of carried streams"
    return "rows of packed documents" if "position_ids" in train_data.column_names else "blocks"


def format_perplexity(loss: float) -> str:
    """exp(loss) for printing: no decimals from 1,000 up."""
    ppl = math.exp(loss)
    return f"{ppl:,.0f}" if ppl >= 1000 else f"{ppl:,.1f}"


def load_model_and_tokenizer(model=None, tokenizer=None, config_overrides: dict | None = None, seed: int = 0):
    """(model, tokenizer, description) for `train`.

    `model`: None (a new demo-sized xLSTM[7:1], `xlstm_hf.demo.demo_config(**config_overrides)`, with the
    shipped GPT-2 tokenizer), a model folder or Hub id (loaded in float32 with `AutoModelForCausalLM`,
    `config_overrides` applied to its config, e.g. `{"dropout": 0.1}`), or a model instance. `tokenizer`:
    None (the model folder's tokenizer, else the shipped GPT-2 tokenizer), a folder/id or an instance.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, set_seed

    from .demo import demo_config
    from .modeling_xlstm import xLSTMForCausalLM

    overrides = dict(config_overrides or {})
    set_seed(seed)
    if model is None:
        config = demo_config(**overrides)
        model = xLSTMForCausalLM(config)
        description = f"new {config.layout}, {config.num_blocks} blocks, hidden {config.hidden_size}"
    elif isinstance(model, (str, os.PathLike)):
        path = str(model)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides)
        description = f"{type(model).__name__} from {path}"
        if tokenizer is None:
            folder = Path(path)
            has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
            if has_tokenizer or not folder.is_dir():
                tokenizer = path
            else:
                description += " (the folder has no tokenizer: using the shipped GPT-2 tokenizer)"
    elif isinstance(model, PreTrainedModel):
        if overrides:
            raise ValueError("config_overrides apply to a new model or one loaded from a path, not to a model instance")
        description = type(model).__name__
    else:
        raise TypeError(f"model must be None, a path or a PreTrainedModel, got {type(model).__name__}")
    if tokenizer is None:
        tokenizer = load_gpt2_tokenizer()
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    check_vocab(tokenizer, model.config)
    return model, tokenizer, description


def train(
    data,
    output_dir: str | Path,
    model=None,
    tokenizer=None,
    *,
    config_overrides: dict | None = None,
    block_size: int = 128,
    eval_fraction: float = 0.1,
    packing: bool = False,
    carry_state: bool = False,
    max_steps: int | None = None,
    epochs: float = 1.0,
    batch_size: int = 8,
    lr: float = 1e-3,
    grad_accum: int = 1,
    warmup_steps: float = 0.1,
    lr_scheduler_type: str = "cosine",
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    eval_steps: float | None = None,
    logging_steps: float = 10,
    save_steps: int | None = None,
    resume_from_checkpoint: str | bool | None = None,
    training_args: dict | None = None,
    callbacks: list | None = None,
    progress: bool = True,
    out: TextIO | None = None,
) -> TrainResult:
    """Train `model` on `data` with `transformers.Trainer` and save model + tokenizer to `output_dir`.

    data: text file(s)/folder(s) (see `text_dataset`; cut into `block_size` blocks, `eval_fraction` held
        out) or a ready `DatasetDict` with "train" (and optionally "validation") rows of equal-length
        `input_ids` (and `labels`, `attention_mask`, `position_ids`: e.g. `pack_documents` rows).
    packing: (text data) whole documents packed into rows with exact resets instead of one concatenated
        stream (see `text_dataset`).
    carry_state: truncated backpropagation through time (`StatefulTrainer`): each batch row reads its
        documents in consecutive segments of `block_size` tokens, starting from the state the previous
        segment ended with (text data: `text_dataset(streams=...)`; a ready "train" split: `stream_segments`
        rows for batch_size rows and grad_accum).
    model, tokenizer, config_overrides: see `load_model_and_tokenizer` (default: a new demo-sized
        xLSTM[7:1] with the shipped GPT-2 tokenizer).
    max_steps / epochs: training length in optimizer steps (wins when given) or epochs over "train".
    batch_size: sequences per device per forward pass; with `grad_accum` micro-batches per optimizer
        step, a step sees `batch_size * grad_accum` blocks. The loss is normalised by the number of
        predicted tokens of the whole step (Trainer's `num_items_in_batch`).
    lr, warmup_steps (int, or a float < 1 = fraction of the steps), lr_scheduler_type, weight_decay,
        max_grad_norm: AdamW and its schedule, as in `TrainingArguments` (weight decay applies to weight
        matrices only: see `MatrixDecayTrainer`).
    bf16: bfloat16 autocast (on CPU too); weights stay float32.
    gradient_checkpointing: recompute each block's activations in backward (less memory, slower).
    eval_steps: evaluate every N steps (a float < 1 is a fraction of the run; default 0.2, five times).
    save_steps: also write resumable checkpoints (`output_dir/checkpoint-N`) every N steps.
    resume_from_checkpoint: a checkpoint folder (or True for the latest in `output_dir`) to continue from;
        the evaluation before training is not run again (the checkpoint's log history holds the first run's).
    training_args: further `TrainingArguments` fields (they override the ones set here).
    progress: Trainer's progress bars and log lines; `out`: where the summary lines go (default stdout).

    Returns a `TrainResult` with the logged training losses and the evaluation loss/perplexity before and
    after training.
    """
    from datasets import Dataset, DatasetDict
    from transformers import PrinterCallback, TrainingArguments, default_data_collator

    out = out if out is not None else sys.stdout
    say = lambda *args: print(*args, file=out, flush=True)  # noqa: E731
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size and grad_accum must be at least 1, got {batch_size} and {grad_accum}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if max_steps is None and not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if not lr > 0:
        raise ValueError(f"the learning rate must be positive, got {lr}")
    if packing and carry_state:
        raise ValueError("packing and carry_state exclude each other: with a carried state the documents are read "
                         "in streams (stream_segments), which keep them apart already")
    output_dir = Path(output_dir)

    if isinstance(data, Dataset):
        data = DatasetDict(train=data)
    if not isinstance(data, DatasetDict):
        text_files(data)  # a missing file is reported before a model is built
    model, tokenizer, description = load_model_and_tokenizer(model, tokenizer, config_overrides, seed)
    if not isinstance(data, DatasetDict):
        data = text_dataset(data, tokenizer, block_size, eval_fraction=eval_fraction, seed=seed, packing=packing,
                            streams=(batch_size, grad_accum) if carry_state else None)
    train_data = data["train"]
    eval_data = data["validation"] if "validation" in data and len(data["validation"]) else None
    if len(train_data) == 0:
        raise ValueError("the training split is empty")
    block = len(train_data[0]["input_ids"])
    num_params = model.num_parameters()
    use_cache = getattr(model.config, "use_cache", None)

    args = dict(
        output_dir=str(output_dir),
        max_steps=max_steps if max_steps is not None else -1,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler_type=lr_scheduler_type,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        bf16=bf16,
        activation_checkpointing=gradient_checkpointing,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        logging_steps=logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_data is not None else "no",
        eval_on_start=eval_data is not None and not resume_from_checkpoint,
        eval_steps=(eval_steps if eval_steps is not None else 0.2) if eval_data is not None else None,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        disable_tqdm=not progress,
        include_num_input_tokens_seen="non_padding",  # (attention_mask's sum where there is one)
    )
    args.update(training_args or {})
    trainer = (StatefulTrainer if carry_state else MatrixDecayTrainer)(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), _SayEvalBeforeTraining(out), timer := _EvalTime()],
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)  # the log lines that replace the progress bar

    device = trainer.args.device
    say(f"model: {description}, {num_params / 1e6:.1f}M parameters, on {device.type}"
        f"{' with bf16 autocast' if bf16 else ''}{', gradient checkpointing' if gradient_checkpointing else ''}")
    kind = data_kind(train_data, carry_state)
    say(f"data: {len(train_data):,} training {kind} / {len(eval_data) if eval_data is not None else 0:,} validation "
        f"rows of {block} tokens; batches of {batch_size} x {grad_accum} (accumulated) rows per step"
        + (", each row continuing its stream's state" if carry_state else ""))

    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    seconds = time.perf_counter() - start
    eval_seconds = min(timer.seconds, seconds)  # (before the final evaluation below)
    state = trainer.state
    history = state.log_history
    train_losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    eval_losses = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    eval_before = eval_losses[0][1] if eval_losses and eval_losses[0][0] == 0 else None  # from eval_on_start

    eval_after = None
    if eval_data is not None:
        if eval_losses and eval_losses[-1][0] == state.global_step > 0:
            eval_after = eval_losses[-1][1]  # already evaluated at the last step
        else:
            eval_after = trainer.evaluate()["eval_loss"]
            eval_losses.append((state.global_step, eval_after))

    tokens = int(state.num_input_tokens_seen or 0)
    speed = tokens / (seconds - eval_seconds) if seconds > eval_seconds else 0.0
    say(f"trained {state.global_step} steps ({state.epoch or 0:.2f} epochs) in {seconds:.0f} s, "
        f"{speed:,.0f} real tokens/s (evaluations not counted), training loss {output.training_loss:.3f}")
    if eval_after is not None:
        before = f"{eval_before:.3f} -> " if eval_before is not None else ""
        before_ppl = f"{format_perplexity(eval_before)} -> " if eval_before is not None else ""
        say(f"validation loss {before}{eval_after:.3f}, perplexity {before_ppl}{format_perplexity(eval_after)}")

    # Trainer switched the config's use_cache off for training; the saved model should generate as before.
    if use_cache is not None:
        model.config.use_cache = use_cache
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    say(f"saved model and tokenizer to {output_dir.resolve()}")

    return TrainResult(
        output_dir=str(output_dir), model_description=description, num_params=num_params,
        train_blocks=len(train_data), eval_blocks=len(eval_data) if eval_data is not None else 0, block_size=block,
        steps=state.global_step, epochs=float(state.epoch or 0.0), train_seconds=seconds,
        train_loss=float(output.training_loss), train_tokens=tokens, eval_seconds=eval_seconds,
        train_losses=train_losses, eval_losses=eval_losses,
        eval_loss_before=eval_before, eval_loss_after=eval_after,
    )


# --------------------------------------------------------------------------------------------------
# Training with carried state (truncated backpropagation through time)
# --------------------------------------------------------------------------------------------------


def stream_segments(documents, rows: int, segment_length: int, accumulation: int = 1, pad_token_id: int = 0):
    """Long documents as consecutive segments for training with a carried state (`StatefulTrainer`).

    The documents (lists of token ids) are dealt into `rows * accumulation` streams, each the concatenation of
    whole documents (each document to the stream that is shortest so far, longest documents first), and
    every stream is cut into segments of `segment_length` tokens. The k-th training step then trains on
    segment k of every stream: micro-batch j of the step (of `accumulation`) on streams j*rows ..
    (j+1)*rows - 1, always in the same batch rows, so that the state each row ends a segment with is the
    state its next segment starts from.

    Returns a `datasets.Dataset` in the order a sequential sampler with batch size `rows` must read it, with
    `input_ids`, `attention_mask` (0 at the padding that ends a shorter stream), `position_ids` (each token's
    position in its document: 0 where a document starts, so the model drops the carried state there, and
    counting on across segments where a document continues), `labels` (the ids; the loss reads
    `shift_labels`, Trainer needs `labels` to count the step's targets) and `shift_labels` (the next token of the
    stream for every position, including the first token of the next segment, -100 where the next token
    starts another document or is padding): the losses of a stream's segments add up to the loss of its
    documents trained whole.
    """
    from datasets import Dataset

    if rows < 1 or accumulation < 1 or segment_length < 1:
        raise ValueError(f"rows, accumulation and segment_length must be positive, got {rows}, {accumulation}, "
                         f"{segment_length}")
    documents = [list(d) for d in documents if len(d) > 0]
    count = rows * accumulation
    if len(documents) < count:
        raise ValueError(f"{len(documents)} documents cannot fill {count} streams (rows x accumulation); use fewer "
                         "rows, less accumulation or more documents")
    streams = [{"ids": [], "pos": []} for _ in range(count)]
    for doc in sorted(documents, key=len, reverse=True):
        stream = min(streams, key=lambda s: len(s["ids"]))
        stream["ids"] += doc
        stream["pos"] += range(len(doc))
    steps = -(-max(len(s["ids"]) for s in streams) // segment_length)
    columns = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": [], "shift_labels": []}
    for k in range(steps):
        for stream in streams:  # micro-batch j holds streams j*rows .. (j+1)*rows - 1, in order
            ids, pos = stream["ids"], stream["pos"]
            span = range(k * segment_length, (k + 1) * segment_length)
            real = [t < len(ids) for t in span]
            columns["input_ids"].append([ids[t] if ok else pad_token_id for t, ok in zip(span, real)])
            columns["labels"].append(columns["input_ids"][-1])  # (unused beside shift_labels; Trainer counts them)
            columns["attention_mask"].append([int(ok) for ok in real])
            columns["position_ids"].append([pos[t] if ok else 0 for t, ok in zip(span, real)])
            columns["shift_labels"].append([ids[t + 1] if t + 1 < len(ids) and pos[t + 1] > 0 else -100 for t in span])
    return Dataset.from_dict(columns)


#: where StatefulTrainer keeps the carried states in a checkpoint folder
CARRIED_STATE_FILE = "xlstm_carried_state.pt"


class StatefulTrainer(MatrixDecayTrainer):
    """`Trainer` that carries the recurrent state from step to step: truncated backpropagation through time.

    Train it on `stream_segments(documents, rows=per_device_train_batch_size, segment_length=...,
    accumulation=gradient_accumulation_steps)`; the data is read in order (a sequential sampler). Each
    micro-batch continues from the state its rows ended the previous step with, cut from the graph
    (`xLSTMCache.detach`), so a step's backward stops at the segment's start; a document that starts in a
    segment starts from a fresh state (its position_ids are 0 there). Each of the `gradient_accumulation_steps`
    micro-batch slots has its own state. The states are saved with every checkpoint (`CARRIED_STATE_FILE`) and
    restored by `train(resume_from_checkpoint=...)`, so a resumed run continues exactly. Evaluation runs
    without carried state. One process only: a distributed sampler would deal the rows to different
    processes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError("StatefulTrainer runs on one process: its rows must reach the same process every step")
        data, streams = self.train_dataset, self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        if data is not None and ("shift_labels" not in data.column_names or len(data) % streams):
            raise ValueError(
                f"StatefulTrainer trains on stream_segments(documents, rows={self.args.per_device_train_batch_size}, "
                f"segment_length, accumulation={self.args.gradient_accumulation_steps}) rows: a multiple of {streams} "
                "rows with shift_labels, read in order")
        self._carried: dict[int, object] = {}
        self._micro_batches = 0

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "shift_labels" not in self._signature_columns:  # a loss keyword of the forward's **kwargs
            self._signature_columns.append("shift_labels")

    def _get_train_sampler(self, *args, **kwargs):
        import torch.utils.data

        return torch.utils.data.SequentialSampler(self.train_dataset)  # the streams' segments, in order

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: no carried state
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .modeling_xlstm import xLSTMCache

        slot = self._micro_batches % self.args.gradient_accumulation_steps
        self._micro_batches += 1
        config = self.accelerator.unwrap_model(model).config
        cache = self._carried[slot] if slot in self._carried else xLSTMCache(config)
        inputs = {**inputs, "cache": cache, "use_cache": True}
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._carried[slot] = cache.detach()  # (the cache passed in is advanced in place)
        return result

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        states = {slot: {"states": cache.states, "seen_tokens": cache.seen_tokens}
                  for slot, cache in self._carried.items()}
        torch.save({"micro_batches": self._micro_batches, "carried": states}, folder / CARRIED_STATE_FILE)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        from transformers.trainer_utils import get_last_checkpoint

        from .modeling_xlstm import xLSTMCache

        self._carried, self._micro_batches = {}, 0
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if folder:
            path = Path(folder) / CARRIED_STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{folder} has no {CARRIED_STATE_FILE}: it was not written by StatefulTrainer, "
                                        "so the state its rows carried is lost")
            saved = torch.load(path, map_location=self.args.device, weights_only=True)
            self._micro_batches = saved["micro_batches"]
            for slot, entry in saved["carried"].items():
                self._carried[slot] = xLSTMCache.from_states(entry["states"], entry["seen_tokens"])
        return super().train(resume_from_checkpoint, *args, **kwargs)


__all__ = ["CARRIED_STATE_FILE", "MatrixDecayTrainer", "StatefulTrainer", "TrainResult", "check_vocab",
           "format_perplexity", "load_model_and_tokenizer", "pack_documents", "stream_segments", "text_dataset",
           "text_files", "train"]
