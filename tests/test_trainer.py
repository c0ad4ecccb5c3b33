"""Training with the Hugging Face `Trainer`, offline on real text: `xlstm_hf.train` and `xlstm-hf train`.

Tiny models from conftest.py on CPU. The tests that tokenise text use the real GPT-2 vocabulary (a tiny
model with a 50304-row embedding) and a slice of the bundled Shakespeare text; the exactness tests
(gradient accumulation, checkpointing, resuming) use the 97-token tiny model on random ids. The fast tests
run on one thread: for models this small, a second thread only adds synchronisation.
"""

import io
import json
import math

import pytest
import torch
from conftest import run_cli, tiny_config, tiny_model
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import xlstm_hf  # noqa: F401  (registers the Auto classes)
from xlstm_hf import cli, xLSTMForCausalLM
from xlstm_hf.demo import SHAKESPEARE_PATH
from xlstm_hf.tokenization import load_gpt2_tokenizer
from xlstm_hf.train import (
    MatrixDecayTrainer,
    TrainResult,
    check_vocab,
    pack_documents,
    text_dataset,
    text_files,
    train,
)

#: tiny_config overrides for a tiny model with the real GPT-2 vocabulary (padded to 50304)
REAL_VOCAB = dict(vocab_size=50304, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256, hidden_size=32,
                  num_blocks=2, slstm_at=[1])
#: the same tiny model as overrides of the default (demo) config, for `xlstm-hf train --config-overrides`
TINY_OVERRIDES = dict(hidden_size=32, num_blocks=2, slstm_at=[1], mlstm_num_heads=2, slstm_num_heads=2, chunk_size=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """The first 30,000 characters of the bundled text (9,010 GPT-2 tokens: Hamlet's opening scenes)."""
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(SHAKESPEARE_PATH.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


def real_vocab_model(seed: int = 0) -> xLSTMForCausalLM:
    """A tiny model with the real vocabulary and the official initialisation (what one would train)."""
    torch.manual_seed(seed)
    return xLSTMForCausalLM(tiny_config(**REAL_VOCAB))


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def trainer_args(output_dir, **overrides) -> TrainingArguments:
    """Quiet CPU TrainingArguments without checkpoints, overridable."""
    kwargs = dict(use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
                  dataloader_pin_memory=False, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(str(output_dir), **kwargs)


# ---------------------------------------------------------------------------------------------------
# text_dataset
# ---------------------------------------------------------------------------------------------------


def test_text_dataset_cuts_the_token_stream_into_blocks(text_file, tokenizer):
    stream = tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    data = text_dataset(text_file, tokenizer, block_size=32, eval_fraction=0.1, seed=0)
    assert set(data) == {"train", "validation"}
    n_blocks = len(stream) // 32
    assert len(data["train"]) + len(data["validation"]) == n_blocks
    assert len(data["validation"]) == round(0.1 * n_blocks)
    rows = list(data["train"]) + list(data["validation"])
    assert all(len(row["input_ids"]) == 32 and row["labels"] == row["input_ids"] for row in rows)
    # together the two splits are exactly the stream's blocks (the partial last block dropped)
    expected = sorted(tuple(stream[i : i + 32]) for i in range(0, n_blocks * 32, 32))
    assert sorted(tuple(row["input_ids"]) for row in rows) == expected
    # the split is random but seeded
    again = text_dataset(text_file, tokenizer, block_size=32, eval_fraction=0.1, seed=0)
    other = text_dataset(text_file, tokenizer, block_size=32, eval_fraction=0.1, seed=1)
    assert again["validation"]["input_ids"] == data["validation"]["input_ids"]
    assert other["validation"]["input_ids"] != data["validation"]["input_ids"]


def test_text_dataset_reads_folders_and_lists_with_eos_after_each_file(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("Second document, about the ghost.", encoding="utf-8")
    (folder / "a.txt").write_text("First document: who's there?", encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file", encoding="utf-8")
    single = tmp_path / "single.txt"
    single.write_text("A third, standalone file.", encoding="utf-8")
    assert [p.name for p in text_files([folder, single])] == ["a.txt", "b.txt", "single.txt"]

    eos = tokenizer.eos_token_id
    stream = []
    for text in ("First document: who's there?", "Second document, about the ghost.", "A third, standalone file."):
        stream += tokenizer(text)["input_ids"] + [eos]
    data = text_dataset([folder, single], tokenizer, block_size=4, eval_fraction=0.0)
    assert len(data["validation"]) == 0
    # without a validation split, the blocks stay in stream order
    assert sum(data["train"]["input_ids"], []) == stream[: len(stream) // 4 * 4]
    assert stream.count(eos) == 3


def test_text_dataset_errors(tmp_path, tokenizer, text_file):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        text_dataset(tmp_path / "missing.txt", tokenizer, 32)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        text_dataset(tmp_path / "empty_folder", tokenizer, 32)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        text_dataset(empty, tokenizer, 32)
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.", encoding="utf-8")
    with pytest.raises(ValueError, match="fewer than one block of 32"):
        text_dataset(short, tokenizer, 32)
    with pytest.raises(ValueError, match="too few to hold out"):
        text_dataset(short, tokenizer, 8)  # 8 tokens with eos: one block, nothing left to train on
    assert len(text_dataset(short, tokenizer, 8, eval_fraction=0)["train"]) == 1
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match="not UTF-8"):
        text_dataset(binary, tokenizer, 32)
    with pytest.raises(ValueError, match="block_size"):
        text_dataset(text_file, tokenizer, 1)
    with pytest.raises(ValueError, match="eval_fraction"):
        text_dataset(text_file, tokenizer, 32, eval_fraction=1.0)


def test_text_dataset_over_more_files_than_a_map_batch(tmp_path, tokenizer):
    """1,201 small files (datasets' map works in batches of 1,000 rows by default): the blocks are those of the
    whole concatenated stream, none lost at a batch boundary."""
    folder = tmp_path / "many"
    folder.mkdir()
    texts = [f"Line {i}: {'to be or not ' * (i % 5)}" for i in range(1201)]
    for i, text in enumerate(texts):
        (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    stream = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    data = text_dataset(folder, tokenizer, block_size=7, eval_fraction=0.0)
    assert len(data["train"]) == len(stream) // 7
    assert sum(data["train"]["input_ids"], []) == stream[: len(stream) // 7 * 7]


def test_text_dataset_errors_come_before_progress_bars(tmp_path, tokenizer, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(ValueError, match="no text to train on"):
        text_dataset([empty, empty], tokenizer, 32)
    assert capsys.readouterr().err == ""  # no "tokenising: 100%" before the error
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.", encoding="utf-8")
    for block_size, eval_fraction, message in [(32, 0.1, "fewer than one block"), (8, 0.1, "too few to hold out")]:
        with pytest.raises(ValueError, match=message):
            text_dataset(short, tokenizer, block_size, eval_fraction=eval_fraction)
        assert "grouping into blocks" not in capsys.readouterr().err  # the tokenising did run; the grouping not


def test_check_vocab(tokenizer):
    check_vocab(tokenizer, tiny_config(**REAL_VOCAB))  # 50257 tokens fit in 50304 rows
    with pytest.raises(ValueError, match=r"50257 tokens .* only 97"):
        check_vocab(tokenizer, tiny_config())


# ---------------------------------------------------------------------------------------------------
# Training on the text with Trainer
# ---------------------------------------------------------------------------------------------------


def test_train_on_text_loss_falls_and_perplexity_improves(text_file, tokenizer, tmp_path):
    out = tmp_path / "run"
    result = train(text_file, out, model=real_vocab_model(), tokenizer=tokenizer, block_size=32, max_steps=30,
                   batch_size=8, lr=1e-2, warmup_steps=3, logging_steps=5, eval_steps=10, progress=False)
    assert isinstance(result, TrainResult) and result.steps == 30
    # an untrained model predicts ~uniformly over the vocabulary: loss ~ ln(50304) = 10.83
    assert abs(result.eval_loss_before - math.log(50304)) < 0.3
    steps, losses = zip(*result.train_losses)
    assert steps == (1, 5, 10, 15, 20, 25, 30)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 2.0, losses
    assert [step for step, _ in result.eval_losses] == [0, 10, 20, 30]
    assert result.eval_losses[0][1] == result.eval_loss_before and result.eval_losses[-1][1] == result.eval_loss_after
    assert result.eval_loss_after < result.eval_loss_before - 2.0
    assert result.eval_ppl_after == pytest.approx(math.exp(result.eval_loss_after))
    assert result.eval_ppl_after < result.eval_ppl_before / 5

    # the saved folder is the trained model with its tokenizer, loadable with the Auto classes; the
    # validation loss recomputed from it is the one reported
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(loaded_tokenizer) == 50257 and loaded_tokenizer.eos_token_id == 50256
    assert model.config.use_cache is True  # Trainer switches it off for training; the saved config keeps it
    validation = text_dataset(text_file, loaded_tokenizer, block_size=32, eval_fraction=0.1, seed=0)["validation"]
    ids = torch.tensor(validation["input_ids"])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss == pytest.approx(result.eval_loss_after, abs=1e-4)


class LogHistoryAtTrainEnd(TrainerCallback):
    def __init__(self):
        self.history = None

    def on_train_end(self, args, state, control, **kwargs):
        self.history = list(state.log_history)


def test_train_evaluates_on_start_without_pin_memory_warnings(text_file, tokenizer, tmp_path, recwarn):
    """The evaluation before training is Trainer's own (eval_on_start), so it is in the log history; and on a
    CPU the Trainer gets no pin_memory setting it would warn about."""
    recorder = LogHistoryAtTrainEnd()
    printed = io.StringIO()
    result = train(text_file, tmp_path / "out", real_vocab_model(), tokenizer, block_size=32, max_steps=2,
                   batch_size=4, eval_steps=2, eval_fraction=0.05, progress=False, out=printed, callbacks=[recorder])
    evaluations = [entry for entry in recorder.history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [0, 2]
    assert result.eval_losses == [(0, evaluations[0]["eval_loss"]), (2, evaluations[1]["eval_loss"])]
    assert result.eval_loss_before == evaluations[0]["eval_loss"]
    assert f"validation loss before training: {result.eval_loss_before:.3f}" in printed.getvalue()
    if not torch.cuda.is_available():
        assert not [str(w.message) for w in recwarn if "pin_memory" in str(w.message)]


def test_train_with_bf16_autocast_on_cpu(text_file, tokenizer, tmp_path):
    model = real_vocab_model()
    seen = set()
    hook = model.backbone.blocks[0].mlstm.up_proj.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    result = train(text_file, tmp_path / "bf16", model=model, tokenizer=tokenizer, block_size=32, max_steps=20,
                   batch_size=8, lr=1e-2, warmup_steps=2, logging_steps=5, eval_steps=10, bf16=True, progress=False)
    hook.remove()
    assert torch.bfloat16 in seen  # the matmuls really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    losses = [loss for _, loss in result.train_losses]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 1.5, losses
    assert math.isfinite(result.eval_loss_after) and result.eval_loss_after < result.eval_loss_before - 1.5


def test_weight_decay_spares_norm_scales_biases_and_skip_weights(tmp_path, design):
    """With weight decay, `train` decays weight matrices only. Trainer's own rule would also decay the
    (paper) mLSTM's `learnable_skip` (initialised to 1) towards 0; the norms it already spares by name."""
    model = tiny_model(design=design)
    trainer = MatrixDecayTrainer(model=model, args=trainer_args(tmp_path, weight_decay=0.1))
    decayed = set(trainer.get_decay_parameter_names(model))
    for name, p in model.named_parameters():
        assert (name in decayed) == (p.dim() >= 2), name
    assert "backbone.blocks.0.mlstm.out_norm.weight" not in decayed
    plain = set(Trainer(model=model, args=trainer_args(tmp_path, weight_decay=0.1)).get_decay_parameter_names(model))
    assert not any("norm" in name for name in plain)  # every norm is named so that Trainer spares it
    norm_types = {type(m).__name__ for name, m in model.named_modules() if name.endswith("norm")}
    assert norm_types == {"RMSNorm" if design == "large" else "LayerNorm", "MultiHeadLayerNorm"}
    if design == "paper":
        assert "backbone.blocks.0.mlstm.learnable_skip" not in decayed
    trainer.create_optimizer()
    groups = {group["weight_decay"]: {id(p) for p in group["params"]} for group in trainer.optimizer.param_groups}
    assert groups[0.1] == {id(p) for p in model.parameters() if p.dim() >= 2}


def random_dataset(n: int = 8, length: int = 16, seed: int = 0, ignored=None) -> Dataset:
    """Random ids of the 97-token tiny model; `ignored[i]` leading labels of row i are -100."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (n, length), generator=gen)
    labels = ids.clone()
    for row, count in enumerate(ignored or []):
        labels[row, :count] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """(batch 4, accumulate 1) and (batch 2, accumulate 2) over the same rows in the same order reach the
    same weights: float64, plain SGD (no momentum, constant lr, no clipping), so the update is exactly
    -lr * gradient of the step's loss, and the two runs may differ only by rounding.

    The rows have very different numbers of valid labels (the leading `ignored` labels are -100), so the
    two micro-batches of a step hold different token counts (steps 1 and 2: 15+3 vs 12+6 and 1+14 vs
    8+4 predictions). The step's loss must be the sum of the token losses divided by the number of
    predictions in the WHOLE step (Trainer's `num_items_in_batch`, which our forward passes to
    `loss_function`). A model that took the mean per micro-batch and let Trainer average the micro-batch
    means weights the tokens of the smaller micro-batch more, and ends elsewhere; the control run below
    is exactly that (Trainer's path for models that do not accept `num_items_in_batch`) and must differ
    by far more than the tolerance.
    """
    data = random_dataset(ignored=[0, 12, 3, 9, 14, 1, 7, 11])

    def run(batch_size, accumulation, control=False):
        model = tiny_model(dtype=torch.float64).train()
        args = trainer_args(tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                            max_steps=2, optim="sgd", learning_rate=0.05, lr_scheduler_type="constant",
                            max_grad_norm=0.0, train_sampling_strategy="sequential")
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
        if control:
            trainer.model_accepts_loss_kwargs = False  # mean loss per micro-batch, averaged over micro-batches
        trainer.train()
        return params(model)

    start = params(tiny_model(dtype=torch.float64))
    full, accumulated, wrong = run(4, 1), run(2, 2), run(2, 2, control=True)
    assert max_diff(full, start) > 0.1  # the steps moved the weights
    assert max_diff(full, accumulated) < 1e-10
    assert max_diff(full, wrong) > 1e-3


class BlockNormCounter:
    """Counts calls of a module inside each block: with checkpointing, the backward pass runs it again."""

    def __init__(self, model):
        self.calls = 0
        self.hooks = [block.norm.register_forward_hook(self.count) for block in model.backbone.blocks]

    def count(self, *args):
        self.calls += 1


def test_gradient_checkpointing_gives_the_same_gradients(design):
    """Forward/backward with and without activation checkpointing (float64, left-padded batch; the sLSTM
    and mLSTM blocks, or the large design's blocks): identical gradients, and the blocks really were
    recomputed."""
    model = tiny_model(dtype=torch.float64, design=design).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    counter = BlockNormCounter(model)

    def gradients():
        model.zero_grad()
        counter.calls = 0
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, counter.calls

    plain, plain_calls = gradients()
    model.activation_checkpointing_enable()
    checkpointed, checkpointed_calls = gradients()
    assert plain_calls == len(model.backbone.blocks)
    assert checkpointed_calls == 2 * plain_calls  # forward, then again in backward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_trainer_with_gradient_checkpointing_reaches_the_same_weights(tmp_path):
    data = random_dataset(n=8)
    counts = {}

    def run(checkpointing):
        model = tiny_model(dtype=torch.float64).train()
        counter = BlockNormCounter(model)
        args = trainer_args(tmp_path, per_device_train_batch_size=4, max_steps=2, optim="sgd", learning_rate=0.05,
                            lr_scheduler_type="constant", train_sampling_strategy="sequential",
                            activation_checkpointing=checkpointing)
        Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
        counts[checkpointing] = counter.calls
        return params(model)

    plain, checkpointed = run(False), run(True)
    assert counts[True] == 2 * counts[False]  # TrainingArguments turned checkpointing on
    assert max_diff(plain, checkpointed) < 1e-12


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps (as a crash or a time limit would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class StepCounter(TrainerCallback):
    """Records the optimizer steps a run executes."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    """8 steps straight vs 5 steps, interrupted, then resumed from checkpoint-5 by a new Trainer with a
    differently initialised model: identical weights. The run shuffles (random sampler: the resumed run
    must restore the data order and RNG state), accumulates 2 micro-batches, uses AdamW with weight decay
    and a cosine schedule with warmup (optimizer and scheduler state must be restored), and the
    interruption falls in the middle of the second epoch (12 rows, 4 per step: 3 steps per epoch)."""
    data = random_dataset(n=12)

    def make(output_dir, model_seed, callbacks=()):
        model = tiny_model(seed=model_seed).train()
        args = trainer_args(output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=8,
                            learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1,
                            save_strategy="steps", save_steps=5, seed=3)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                          callbacks=list(callbacks))
        return trainer, model

    trainer, straight = make(tmp_path / "straight", 0)
    trainer.train()
    straight_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]

    trainer, interrupted = make(tmp_path / "resumed", 0, [StopAt(5)])
    trainer.train()
    assert trainer.state.global_step == 5 and (tmp_path / "resumed" / "checkpoint-5").is_dir()
    at_five = params(interrupted)

    trainer, resumed = make(tmp_path / "resumed", 1)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-5"))
    resumed_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert trainer.state.global_step == 8
    assert max_diff(params(straight), at_five) > 1e-3  # the last three steps matter
    assert max_diff(params(straight), params(resumed)) < 1e-6
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-6)


def test_train_resumes_from_its_own_checkpoints(text_file, tmp_path):
    """`train(save_steps=...)` then `train(resume_from_checkpoint=True)` after an interruption ends where an
    uninterrupted run ends (the `--save-steps` / `--resume-from-checkpoint` path of `xlstm-hf train`)."""
    from safetensors.torch import load_file

    kwargs = dict(config_overrides=TINY_OVERRIDES, block_size=32, max_steps=6, batch_size=4, lr=1e-2, logging_steps=1,
                  eval_fraction=0.05, save_steps=3, progress=False)
    straight = train(text_file, tmp_path / "straight", **kwargs)
    train(text_file, tmp_path / "resumed", callbacks=[StopAt(3)], **kwargs)
    interrupted = load_file(tmp_path / "resumed" / "model.safetensors")
    counter = StepCounter()
    resumed = train(text_file, tmp_path / "resumed", resume_from_checkpoint=True, callbacks=[counter], **kwargs)
    assert counter.steps == [4, 5, 6]  # continued from checkpoint-3 (a fresh start would reach the same weights)
    assert resumed.steps == 6
    # not evaluated again before the resumed steps: the "before" is the first run's, from the checkpoint's log
    assert resumed.eval_loss_before == straight.eval_loss_before and resumed.eval_losses[0][0] == 0
    assert [step for step, _ in resumed.eval_losses].count(0) == 1
    final = load_file(tmp_path / "resumed" / "model.safetensors")
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    assert max_diff(expected, interrupted) > 1e-3
    assert max_diff(expected, final) < 1e-6
    assert resumed.eval_loss_after == pytest.approx(straight.eval_loss_after, abs=1e-6)


def test_trainer_with_the_default_config_use_cache_true(tmp_path, design):
    """The config default use_cache=True: training with Trainer (which turns it off) and with
    `TrainingArguments(use_cache=True)` (which leaves it on, so evaluation builds caches) trains, evaluates
    (also through `compute_metrics`, which sees the model outputs) and gives the same weights and losses.
    transformers' own xLSTM crashes in backward here (its model is the large design)."""
    data = random_dataset(n=8)
    assert tiny_config(design).use_cache is True

    def run(use_cache):
        model = tiny_model(design=design)
        args = trainer_args(tmp_path, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                            use_cache=use_cache, eval_strategy="steps", eval_steps=3)
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                          data_collator=default_data_collator,
                          compute_metrics=lambda pred: {"rows": float(len(pred.predictions))})
        assert model.config.use_cache is use_cache
        trainer.train()
        metrics = trainer.evaluate()
        return params(model), metrics, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    start = params(tiny_model(design=design))
    (off, off_metrics, off_losses), (on, on_metrics, on_losses) = run(False), run(True)
    assert max_diff(off, start) > 1e-3
    assert max_diff(off, on) == 0.0 and off_losses == on_losses
    assert on_metrics["eval_rows"] == 8.0 and math.isfinite(on_metrics["eval_loss"])
    assert on_metrics["eval_loss"] == pytest.approx(off_metrics["eval_loss"], abs=1e-6)

    # and directly: a training forward that also returns the state backpropagates to the same gradients
    model = tiny_model(dtype=torch.float64, design=design).train()
    ids = torch.tensor(data["input_ids"][:2])

    def gradients(**kwargs):
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, **kwargs)
        out.loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, out.past_key_values

    without, no_cache = gradients(use_cache=False)
    with_cache, cache = gradients(use_cache=True)
    assert no_cache is None and cache is not None and cache.get_seq_length() == ids.shape[1]
    assert max_diff(without, with_cache) == 0.0


# ---------------------------------------------------------------------------------------------------
# xlstm-hf train
# ---------------------------------------------------------------------------------------------------


def test_train_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xlstm-hf train")
    for option in ("DATA", "--output-dir", "--model", "--max-steps", "--epochs", "--batch-size", "--block-size", "--lr",
                   "--grad-accum", "--bf16", "--gradient-checkpointing", "--seed", "--config-overrides"):
        assert option in out, option


def test_train_command_passes_its_options(monkeypatch, tmp_path, text_file):
    import xlstm_hf.train as train_module

    calls = []

    def fake_train(data, output_dir, **kwargs):
        calls.append((data, output_dir, kwargs))
        return TrainResult(output_dir=str(output_dir), model_description="fake", num_params=1, train_blocks=9,
                           eval_blocks=1, block_size=64, steps=3, epochs=0.5, train_seconds=1.0, train_loss=5.0,
                           eval_loss_before=10.0, eval_loss_after=5.0)

    monkeypatch.setattr(train_module, "train", fake_train)
    argv = ["train", str(text_file), str(text_file.parent), "--output-dir", str(tmp_path / "o"), "--max-steps", "3",
            "--epochs", "2", "--batch-size", "4", "--block-size", "64", "--lr", "3e-4", "--grad-accum", "2", "--bf16",
            "--gradient-checkpointing", "--seed", "7", "--config-overrides", '{"dropout": 0.1}', "--save-steps", "2",
            "--pack"]
    assert cli.main(argv) == 0
    (data, output_dir, kwargs), = calls
    assert data == [str(text_file), str(text_file.parent)] and output_dir == str(tmp_path / "o")
    expected = dict(model=None, max_steps=3, epochs=2.0, batch_size=4, block_size=64, lr=3e-4, grad_accum=2, bf16=True,
                    gradient_checkpointing=True, seed=7, config_overrides={"dropout": 0.1}, save_steps=2, packing=True)
    assert {key: kwargs[key] for key in expected} == expected


def test_train_command_end_to_end(text_file, tmp_path, capsys):
    out = tmp_path / "cli-run"
    argv = ["train", str(text_file), "--output-dir", str(out), "--max-steps", "5", "--batch-size", "4",
            "--block-size", "32", "--lr", "1e-2", "--logging-steps", "1", "--eval-steps", "5",
            "--eval-fraction", "0.05",
            "--config-overrides", json.dumps(TINY_OVERRIDES)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "validation loss before training" in printed
    assert f"saved model and tokenizer to {out.resolve()}" in printed
    summary = printed[printed.index("summary:"):]
    before, after = (float(x) for x in summary.split("validation  loss ")[1].split(",")[0].split(" -> "))
    assert after < before

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "xLSTMForCausalLM" and model.config.hidden_size == 32
    assert model.config.layout == "xLSTM[1:1]" and model.config.vocab_size == 50304
    inputs = tokenizer("HAMLET:", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_train_command_bad_input_exits_2(tmp_path, capsys, text_file):
    tiny = json.dumps(TINY_OVERRIDES)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    (tmp_path / "no_text").mkdir()
    # a saved model with a 97-token vocabulary and no tokenizer files: the shipped GPT-2 tokenizer does not fit
    small_vocab = tmp_path / "small-vocab-model"
    tiny_model().save_pretrained(small_vocab)
    capsys.readouterr()
    out = str(tmp_path / "out")
    # (arguments, message, whether stderr is that one line: no progress bar of work done before the error)
    cases = [
        ([str(tmp_path / "missing.txt")], "no such file or folder", True),
        ([str(tmp_path / "no_text")], "no .txt files", True),
        ([str(empty), "--config-overrides", tiny], "empty", True),
        ([str(text_file), "--block-size", "100000", "--config-overrides", tiny], "fewer than one block", False),
        ([str(text_file), "--config-overrides", json.dumps({**TINY_OVERRIDES, "vocab_size": 1000})],
         "50257 tokens but the model's vocabulary (config.vocab_size) has only 1000", True),
        ([str(text_file), "--model", str(small_vocab)],
         "50257 tokens but the model's vocabulary (config.vocab_size) has only 97", False),
        ([str(text_file), "--model", str(tmp_path / "no-model")], "no model folder", True),
        ([str(text_file), "--config-overrides", "{hidden_size: 32}"], "not valid JSON", True),
        ([str(text_file), "--config-overrides", "[1, 2]"], "must be a JSON object", True),
        ([str(text_file), "--max-steps", "0", "--config-overrides", tiny], "--max-steps must be at least 1", True),
    ]
    for args, message, alone in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", *args, "--output-dir", out])
        assert exit_info.value.code == 2, args
        err = capsys.readouterr().err
        last_line = err.strip().split("\n")[-1]  # after the progress bars of work done before the error
        assert last_line.startswith("xlstm-hf train: error:") and message in last_line, (args, last_line)
        if alone:
            assert err == last_line + "\n", (args, err)
    assert not (tmp_path / "out").exists()


def test_train_command_truncated_model_exits_2(tmp_path, capsys, text_file):
    model = tmp_path / "model"
    real_vocab_model().save_pretrained(model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(text_file), "--model", str(model), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().split("\n")[-1]
    assert last_line.startswith(f"xlstm-hf train: error: cannot read the weights in {weights}: the file is truncated")


@pytest.mark.slow
def test_fine_tune_the_demo_model_on_the_bundled_text(tmp_path, capsys):
    """`xlstm-hf train` on the whole bundled text with the default model (the demo's 16M-parameter
    xLSTM[7:1]), then fine-tuned further from the saved folder (the tokenizer comes from there too).
    Takes several minutes on 2 CPU cores."""
    first, second = tmp_path / "scratch", tmp_path / "finetuned"
    torch.set_num_threads(2)  # a 16M-parameter model uses both cores (the module fixture restores the setting)
    assert cli.main(["train", str(SHAKESPEARE_PATH), "--output-dir", str(first), "--max-steps", "60",
                     "--block-size", "64", "--lr", "3e-3", "--eval-steps", "30"]) == 0
    assert cli.main(["train", str(SHAKESPEARE_PATH), "--output-dir", str(second), "--model", str(first),
                     "--max-steps", "20", "--block-size", "64", "--lr", "1e-3", "--grad-accum", "2", "--bf16"]) == 0
    printed = capsys.readouterr().out
    with capsys.disabled():  # the figures, for `pytest -m slow -s`
        print("".join(line + "\n" for line in printed.splitlines() if line.startswith("  validation")))
    summaries = [part.split(",")[0].split(" -> ") for part in printed.split("validation  loss ")[1:]]
    (before_1, after_1), (before_2, after_2) = [(float(a), float(b)) for a, b in summaries]
    assert before_1 > 10.5 and after_1 < 7.5
    assert before_2 == pytest.approx(after_1, abs=0.05)  # same validation split, same model
    assert after_2 < before_2


@pytest.mark.slow
def test_trainer_with_torch_compile_equals_eager(tmp_path):
    """TrainingArguments(torch_compile=True) trains our model on CPU: the same losses as eager training
    (float32 rounding of the fused kernels only), and the graphs compiled in the first step serve every
    later step of the same shape (no recompile per call). The sLSTM's recurrence is a custom operator,
    opaque to the compiler."""
    import torch._dynamo.utils as dynamo_utils

    ids = torch.randint(0, 97, (8, 16))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(compile_: bool):
        class Record(TrainerCallback):
            losses, graphs = [], []

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])

            def on_step_end(self, args, state, control, **kwargs):
                self.graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])

        args = TrainingArguments(tmp_path / str(compile_), per_device_train_batch_size=4, max_steps=6,
                                 logging_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no",
                                 use_cpu=True, torch_compile=compile_, dataloader_num_workers=0)
        dynamo_utils.counters.clear()
        Trainer(model=tiny_model(), args=args, train_dataset=data, data_collator=default_data_collator,
                callbacks=[Record]).train()
        return Record.losses, Record.graphs

    eager, _ = run(False)
    compiled, graphs = run(True)
    assert len(compiled) == len(eager) == 6
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 5, graphs


def test_trainer_with_flattened_batches_equals_padded_batches(tmp_path, design):
    """Trainer with transformers' DataCollatorWithFlattening (padding-free: each batch one row of whole documents,
    position_ids restarting) reaches the same weights as the same documents right-padded one per row
    (DataCollatorForLanguageModeling's padding, attention_mask and labels -100 there): two SGD steps in float64
    over documents of 3-23 tokens. Both runs predict the same tokens (each document's tokens after its first),
    so the losses, gradients and updates agree up to rounding. Control: the flattened row without its
    position_ids lets each document's state flow into the next and ends elsewhere."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening
    from transformers import PreTrainedTokenizerFast

    gen = torch.Generator().manual_seed(3)
    lengths = [3, 17, 9, 23, 5, 11, 4, 15]
    docs = Dataset.from_dict({"input_ids": [torch.randint(1, 97, (n,), generator=gen).tolist() for n in lengths]})

    class Padder(DataCollatorForLanguageModeling):  # right padding with id 0, labels -100 at padding
        def __init__(self):
            from tokenizers import Tokenizer, models

            tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                          pad_token="<pad>")
            super().__init__(tokenizer=tok, mlm=False)

    flattening = DataCollatorWithFlattening()

    def without_positions(features):
        batch = flattening(features)
        del batch["position_ids"]
        return batch

    def run(collator):
        model = tiny_model(design=design, dtype=torch.float64).train()
        args = trainer_args(tmp_path, per_device_train_batch_size=4, max_steps=2, optim="sgd", learning_rate=0.05,
                            lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential",
                            remove_unused_columns=False)
        Trainer(model=model, args=args, train_dataset=docs, data_collator=collator).train()
        return params(model)

    start = params(tiny_model(design=design, dtype=torch.float64))
    padded, flat, leaking = run(Padder()), run(flattening), run(without_positions)
    assert max_diff(padded, start) > 0.05
    assert max_diff(flat, padded) < 1e-10
    assert max_diff(leaking, padded) > 1e-3


def test_pack_documents_keeps_every_piece_apart(design):
    """`pack_documents`: documents longer than a block become block-sized pieces, every piece lands whole in one
    row (best fit: 7 rows for these 212 tokens in blocks of 32, the fewest possible), labels are -100 at each
    piece's first token and at padding, position_ids restart per piece; and a packed row's loss is the pieces'
    losses taken alone (float64), so no piece sees another."""
    gen = torch.Generator().manual_seed(5)
    lengths = [70, 3, 31, 12, 9, 20, 1, 32, 17, 5, 12]
    docs = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in lengths]
    rows = pack_documents(docs, 32)
    assert len(rows) == 7 and all(len(r) == 32 for r in rows["input_ids"])
    pieces = []
    for ids, mask, pos, labels in zip(rows["input_ids"], rows["attention_mask"], rows["position_ids"], rows["labels"]):
        real = sum(mask)
        assert mask == [1] * real + [0] * (32 - real) and labels[real:] == [-100] * (32 - real)
        starts = [t for t in range(real) if pos[t] == 0] + [real]
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b] == list(range(b - a)) and labels[a] == -100 and labels[a + 1:b] == ids[a + 1:b]
            pieces.append(ids[a:b])
    want = [d[s:s + 32] for d in docs for s in range(0, len(d), 32) if len(d[s:s + 32]) >= 2]
    assert sorted(pieces) == sorted(want)  # every piece once (the 1-token document predicts nothing: dropped)

    model = tiny_model(design=design, dtype=torch.float64).train()  # (training: the loss in float64)
    batch = {k: torch.tensor(v) for k, v in rows[:2].items()}
    loss = model(**batch).loss
    count, total = 0, 0.0
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        for a, b in ((a, b) for a, b in _spans(labels)):
            piece = ids[a:b][None]
            total = total + model(piece, labels=piece).loss * (b - a - 1)
            count += b - a - 1
    assert abs(loss.item() - total.item() / count) < 1e-12


def _spans(labels):
    """(start, end) of the pieces of a packed row, from its labels (-100 at a piece's first token and at padding)."""
    labels = labels.tolist()
    real = max(t for t, label in enumerate(labels) if label != -100) + 1
    starts = [t for t in range(real) if labels[t] == -100] + [real]
    return list(zip(starts, starts[1:]))


def test_text_dataset_packs_whole_files(tmp_path, tokenizer):
    """text_dataset(packing=True): every file is a document (with its eos), none is dropped or runs into another;
    the pieces of both splits together are exactly the documents cut into blocks."""
    text = SHAKESPEARE_PATH.read_text(encoding="utf-8")
    (tmp_path / "a.txt").write_text(text[:3000], encoding="utf-8")
    (tmp_path / "b.txt").write_text(text[5000:5400], encoding="utf-8")
    data = text_dataset(tmp_path, tokenizer, 64, eval_fraction=0.2, packing=True)
    pieces = []
    for split in ("train", "validation"):
        for ids, labels in zip(data[split]["input_ids"], data[split]["labels"]):
            pieces += [ids[a:b] for a, b in _spans(torch.tensor(labels))]
    docs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in (text[:3000], text[5000:5400])]
    want = [d[s:s + 64] for d in docs for s in range(0, len(d), 64)]
    assert sorted(pieces) == sorted(want)
    assert len(data["validation"]) >= 1 and set(data["train"].column_names) >= {"position_ids", "attention_mask"}


def test_train_command_packs_and_reports_real_tokens_per_second(text_file, tmp_path, capsys):
    out = tmp_path / "packed-run"
    argv = ["train", str(text_file), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
            "--block-size", "64", "--pack", "--config-overrides", json.dumps(TINY_OVERRIDES)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "training rows of packed documents" in printed and "real tokens/s" in printed


def test_train_command_carries_state(text_file, tmp_path, capsys):
    """`xlstm-hf train --carry-state`: each row reads its stream in consecutive segments (StatefulTrainer); the
    training split is stream_segments' layout, a held-out piece is not trained on; --pack with it is refused."""
    out = tmp_path / "carried"
    argv = ["train", str(text_file), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2",
            "--block-size", "32", "--carry-state", "--config-overrides", json.dumps(TINY_OVERRIDES)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "training segments of carried streams" in printed and "each row continuing its stream's state" in printed
    code, _, err = run_cli(argv + ["--pack"], capsys)
    assert code == 2 and "--pack and --carry-state exclude each other" in err


def test_text_dataset_streams_hold_out_whole_pieces(text_file, tokenizer):
    """text_dataset(streams=(rows, accumulation)): the validation pieces and the training streams together are the
    text exactly once; the training rows are stream_segments' (position_ids continuing across segments)."""
    data = text_dataset(text_file, tokenizer, 64, eval_fraction=0.1, streams=(2, 2))
    train_rows = data["train"]
    assert len(train_rows) % 4 == 0 and {"shift_labels", "position_ids"} <= set(train_rows.column_names)
    trained = sum(sum(m) for m in train_rows["attention_mask"])
    held = sum(sum(m) for m in data["validation"]["attention_mask"])
    doc = tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    assert trained + held == len(doc)
    assert any(r[0] > 0 for r in train_rows["position_ids"][4:])  # some segment continues a document
