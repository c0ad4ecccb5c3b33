"""The `xlstm-hf` command line and the end-to-end demo (train, save, reload, generate).

The demo runs here with a tiny model (64 wide, 2 blocks, the real GPT-2 vocabulary) for a fixed number
of steps, so the result depends only on the seed; the full-size demo is a slow test.
"""

import io
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import xlstm_hf  # noqa: F401  (registers the Auto classes)
import xlstm_hf.demo as demo
import xlstm_hf_cli
from xlstm_hf import cli
from xlstm_hf.demo import DemoResult, evaluate, generate_text, load_corpus, lr_at, planned_steps, run_demo, split_tokens
from xlstm_hf.tokenization import load_gpt2_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY = dict(hidden_size=64, num_blocks=2)
TINY_RUN = dict(minutes=None, max_steps=25, batch_size=4, seq_len=32, warmup_steps=5, eval_windows=8,
                model_overrides=TINY, max_new_tokens=12, progress=False)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny demo run shared by the tests below: (result, output folder, printed text)."""
    import io

    out_dir = tmp_path_factory.mktemp("demo") / "xlstm-demo"
    printed = io.StringIO()
    result = run_demo(out_dir, seed=0, out=printed, **TINY_RUN)
    return result, out_dir, printed.getvalue()


# ---------------------------------------------------------------------------------------------------
# --help and argument handling
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["generate", "--help"], ["convert", "--help"]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xlstm-hf")
    if argv[0] == "--help":
        for command in ("demo", "generate", "convert"):
            assert command in out


def test_help_lists_the_documented_options(capsys):
    expected = {
        "demo": ["--output-dir", "--minutes", "--seed", "--prompt", "--max-new-tokens"],
        "generate": ["--model", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--greedy", "--seed"],
        "convert": ["SRC", "OUT", "--dtype", "float32", "bfloat16", "float16"],
    }
    for command, options in expected.items():
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        for option in options:
            assert option in out, (command, option)


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("xlstm-hf") == "xlstm_hf_cli:main"  # outside the package: see test_cli_starts_without_torch
    assert cli.main is xlstm_hf_cli.main  # `python -m xlstm_hf.cli` and cli.main([...]) are the same command


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"xlstm-hf {xlstm_hf.__version__}"


#: In a fresh process: run `xlstm_hf_cli.main(argv)` for each argv (JSON list in argv[1]) and report the exit code,
#: stderr and which heavy packages got imported by then.
IMPORT_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys

    import xlstm_hf_cli

    HEAVY = ("torch", "transformers", "huggingface_hub", "safetensors", "xlstm_hf")
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = xlstm_hf_cli.main(argv)
            except SystemExit as exit_info:
                code = exit_info.code
        results.append({"argv": argv, "code": code, "err": err.getvalue(),
                        "imported": [name for name in HEAVY if name in sys.modules]})
    print(json.dumps(results))
""")


def argument_error_cases(tmp_path) -> list[tuple[list[str], str]]:
    """(argv, the one line on stderr) of argument errors, each to be reported before anything is loaded."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be.", encoding="utf-8")
    (tmp_path / "no_text").mkdir(exist_ok=True)
    (tmp_path / "src").mkdir(exist_ok=True)
    gen = ["generate", "--model", str(folder)]
    train = ["train", str(text), "--output-dir", str(tmp_path / "out")]
    return [
        (["demo", "--minutes", "0"], "xlstm-hf demo: error: --minutes must be positive, got 0"),
        (["demo", "--max-new-tokens", "0"], "xlstm-hf demo: error: --max-new-tokens must be at least 1, got 0"),
        (["demo", "--prompt", ""],
         "xlstm-hf demo: error: --prompt is empty; give some text to continue, e.g. --prompt 'ROMEO:'"),
        (["generate", "--model", str(tmp_path / "missing")],
         f"xlstm-hf generate: error: no model folder at {tmp_path / 'missing'}"),
        (["generate", "--model", str(tmp_path)],
         f"xlstm-hf generate: error: {tmp_path} is not a model folder (no config.json)"),
        (gen + ["--max-new-tokens", "0"], "xlstm-hf generate: error: --max-new-tokens must be at least 1, got 0"),
        (gen + ["--prompt", ""],
         "xlstm-hf generate: error: --prompt is empty; give some text to continue, e.g. --prompt 'ROMEO:'"),
        (gen + ["--temperature", "0"], "xlstm-hf generate: error: --temperature must be positive, got 0 (or use --greedy)"),
        (gen + ["--top-k", "-1"], "xlstm-hf generate: error: --top-k must be at least 0, got -1"),
        (["train", str(tmp_path / "missing.txt"), "--output-dir", "o"],
         f"xlstm-hf train: error: no such file or folder: {tmp_path / 'missing.txt'}"),
        (["train", str(tmp_path / "no_text"), "--output-dir", "o"],
         f"xlstm-hf train: error: no .txt files in folder {tmp_path / 'no_text'}"),
        (train + ["--model", str(tmp_path / "missing")], f"xlstm-hf train: error: no model folder at {tmp_path / 'missing'}"),
        (train + ["--max-steps", "0"], "xlstm-hf train: error: --max-steps must be at least 1, got 0"),
        (train + ["--epochs", "0"], "xlstm-hf train: error: --epochs must be positive, got 0"),
        (train + ["--batch-size", "0"], "xlstm-hf train: error: --batch-size must be at least 1, got 0"),
        (train + ["--grad-accum", "0"], "xlstm-hf train: error: --grad-accum must be at least 1, got 0"),
        (train + ["--block-size", "1"], "xlstm-hf train: error: --block-size must be at least 2, got 1"),
        (train + ["--lr", "0"], "xlstm-hf train: error: --lr must be positive, got 0"),
        (train + ["--warmup-steps", "-1"], "xlstm-hf train: error: --warmup-steps must be at least 0, got -1"),
        (train + ["--eval-steps", "0"], "xlstm-hf train: error: --eval-steps must be positive, got 0"),
        (train + ["--logging-steps", "0"], "xlstm-hf train: error: --logging-steps must be positive, got 0"),
        (train + ["--save-steps", "0"], "xlstm-hf train: error: --save-steps must be at least 1, got 0"),
        (train + ["--eval-fraction", "1"], "xlstm-hf train: error: --eval-fraction must be in [0, 1), got 1"),
        (train + ["--config-overrides", "[1, 2]"],
         """xlstm-hf train: error: --config-overrides must be a JSON object, e.g. '{"dropout": 0.1}'"""),
        (train + ["--resume-from-checkpoint", str(tmp_path / "missing")],
         f"xlstm-hf train: error: no checkpoint folder at {tmp_path / 'missing'}"),
        (["train", str(text), "--output-dir", str(text)],
         f"xlstm-hf train: error: --output-dir {text} is a file, not a folder"),
        (["convert", str(tmp_path / "missing"), "out"],
         f"xlstm-hf convert: error: no checkpoint folder at {tmp_path / 'missing'}"),
        (["convert", str(tmp_path / "src"), "out", "--weight-mode", "fused"],
         "xlstm-hf convert: error: --weight-mode applies to --to transformers only"),
    ]


def test_argument_errors_are_one_line(tmp_path, capsys):
    for argv, message in argument_error_cases(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2, argv
        captured = capsys.readouterr()
        assert captured.err == message + "\n" and captured.out == "", (argv, captured)


def test_cli_starts_without_torch(tmp_path):
    """--help, --version and every argument error come before torch, transformers or xlstm_hf are imported:
    the console script's module is outside the package (importing xlstm_hf loads torch and transformers)."""
    cases = argument_error_cases(tmp_path)
    runs = [["--help"], ["--version"], ["generate", "--help"], ["train", "--help"], *(argv for argv, _ in cases)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, json.dumps(runs)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)
    assert [r["code"] for r in results] == [0] * 4 + [2] * len(cases)
    assert [r["err"] for r in results[4:]] == [message + "\n" for _, message in cases]
    assert all(r["imported"] == [] for r in results), [r for r in results if r["imported"]]


def test_console_script_help_imports_no_torch():
    script = Path(sys.executable).parent / "xlstm-hf"
    if not script.is_file():
        pytest.skip("the xlstm-hf console script is not installed in this environment")
    out = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: xlstm-hf"), out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "xlstm_hf_cli" in imported
    assert not imported & {"torch", "transformers", "xlstm_hf"}, sorted(imported & {"torch", "transformers", "xlstm_hf"})


def test_demo_command_passes_its_options(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("xlstm_hf.demo.run_demo", lambda *args, **kwargs: calls.append((args, kwargs)))
    argv = ["demo", "--output-dir", str(tmp_path / "d"), "--minutes", "0.5", "--seed", "3", "--prompt", r"KING:\n",
            "--max-new-tokens", "7"]
    assert cli.main(argv) == 0
    (args, kwargs), = calls
    assert args == (str(tmp_path / "d"),)
    assert kwargs["minutes"] == 0.5 and kwargs["seed"] == 3 and kwargs["max_new_tokens"] == 7
    assert kwargs["prompt"] == "KING:\n"  # a typed \n is a newline


def test_demo_command_rejects_a_bad_budget(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--minutes", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--minutes" in err and "Traceback" not in err


def test_generate_missing_folder_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", "/nonexistent"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "/nonexistent" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_generate_folder_without_config_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("keep", [0.5, 4], ids=["half", "first-4-bytes"])
def test_generate_truncated_weights_exits_2(tmp_path, capsys, keep):
    """A truncated model.safetensors: one line naming the file, exit code 2 (safetensors raises SafetensorError,
    which is neither an OSError nor a ValueError)."""
    from conftest import tiny_model

    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", str(tmp_path), "--max-new-tokens", "2", "--greedy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xlstm-hf generate: error: cannot read the weights in {weights}: the file is truncated "
                          f"or corrupt (safetensors: "), err
    assert err.rstrip().endswith("; save or download the model again") and len(err.strip().splitlines()) == 1


def test_generate_unavailable_device_exits_2(demo_run, capsys):
    _, out_dir, _ = demo_run
    for device, message in [("nonsense", "unknown device 'nonsense'"),
                            *([] if torch.cuda.is_available() else
                              [("cuda", "device 'cuda' is not available: torch finds no CUDA GPU on this machine")])]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["generate", "--model", str(out_dir), "--device", device])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"xlstm-hf generate: error: {message}") and len(err.strip().splitlines()) == 1, err


def test_convert_missing_folder_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "missing" in capsys.readouterr().err


def test_convert_calls_the_converter(monkeypatch, tmp_path, capsys):
    import xlstm_hf.conversion.official as official

    calls = []

    def fake_convert(src, out, dtype=None, progress=None, tokenizer="auto"):
        calls.append((src, out, dtype, tokenizer))
        return out

    monkeypatch.setattr(official, "convert_official_checkpoint", fake_convert)
    (tmp_path / "src").mkdir()
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert [(str(s), str(o), d, t) for s, o, d, t in calls] == [
        (str(tmp_path / "src"), str(tmp_path / "out"), torch.bfloat16, "auto")]
    assert "converted" in capsys.readouterr().out
    calls.clear()
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert calls[0][2] is None  # the checkpoint's own dtype
    for flag, tokenizer in (("gpt2", "gpt2"), ("none", None)):
        calls.clear()
        assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--tokenizer", flag]) == 0
        assert calls[0][3] == tokenizer


def test_convert_errors_are_one_line(monkeypatch, tmp_path, capsys):
    import xlstm_hf.conversion.official as official

    def failing_convert(*args, **kwargs):
        raise ValueError("slstm_at: something the model cannot express\nsecond line")

    monkeypatch.setattr(official, "convert_official_checkpoint", failing_convert)
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "xlstm-hf convert: error: slstm_at: something the model cannot express"


# ---------------------------------------------------------------------------------------------------
# The demo's pieces
# ---------------------------------------------------------------------------------------------------


def test_corpus_split_holds_out_the_last_tenth():
    ids = load_corpus(load_gpt2_tokenizer())
    assert ids.dtype == torch.long and len(ids) > 100_000
    train, valid = split_tokens(ids)
    assert len(train) + len(valid) == len(ids)
    assert abs(len(valid) / len(ids) - 0.1) < 0.001
    assert torch.equal(valid, ids[len(train):])


def test_schedule_warms_up_then_decays():
    lrs = [lr_at(step, 101, 1.0, warmup_steps=10) for step in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_schedule_fits_a_short_run():
    """20 steps in all (a slow machine's 3 minutes): warmup over 10% of them, not 20 steps of warmup."""
    lrs = [lr_at(step, 20, 1.0, warmup_steps=20) for step in range(20)]
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == pytest.approx(0.1)
    # while the run's length is unknown (before the first step is timed), the warmup is warmup_steps long
    assert lr_at(0, math.inf, 1.0, warmup_steps=20) == pytest.approx(1 / 20)


def test_planned_steps_follow_the_pace():
    assert planned_steps(0, 0.0, 180.0, None) == math.inf
    assert planned_steps(4, 36.0, 180.0, None) == pytest.approx(20)  # 9 s per step
    assert planned_steps(4, 36.0, 180.0, 10) == 10
    assert planned_steps(3, 100.0, None, 25) == 25  # no time budget: max_steps


def test_evaluate_counts_every_token_once():
    """evaluate() equals the mean loss of one long forward pass split into windows."""
    from xlstm_hf.demo import demo_config
    from xlstm_hf import xLSTMForCausalLM

    torch.manual_seed(0)
    model = xLSTMForCausalLM(demo_config(vocab_size=101, hidden_size=32, num_blocks=2, mlstm_num_heads=2,
                                         slstm_num_heads=2, chunk_size=8)).eval()
    ids = torch.randint(0, 101, (3 * 16 + 1,))
    expected = []
    for w in range(3):
        window = ids[w * 16 : (w + 1) * 16 + 1][None]
        expected.append(model(input_ids=window, labels=window).loss)
    assert evaluate(model, ids, seq_len=16, batch_size=2) == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# End to end: a tiny demo run, the folder it writes, and `generate` on it
# ---------------------------------------------------------------------------------------------------


def test_demo_learns(demo_run):
    result, _, printed = demo_run
    assert isinstance(result, DemoResult)
    assert result.steps == TINY_RUN["max_steps"]
    assert "note: only" not in printed  # a step budget, not a machine too slow for its time budget
    assert result.val_loss_before > 10.0  # ~ln(50304) at initialisation
    assert result.val_loss_after < result.val_loss_before - 1.0
    assert result.val_ppl_after < result.val_ppl_before
    for expected in ("validation loss before training", "validation loss after training", "summary:",
                     result.layout, str(result.output_dir)):
        assert expected in printed


def test_demo_folder_loads_with_auto_classes(demo_run):
    _, out_dir, _ = demo_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / name).is_file(), name
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == "xlstm_paper"
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert type(model).__module__ == "xlstm_hf.modeling_xlstm"
    inputs = tokenizer("HAMLET:\n", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 5)


def test_demo_run_is_reproducible(demo_run, tmp_path):
    """The same seed and step budget give the same losses and the same sampled text."""
    import io

    result, _, _ = demo_run
    again = run_demo(tmp_path / "again", seed=0, out=io.StringIO(), **{**TINY_RUN, "max_steps": 3, "max_new_tokens": 4, "stream": False})
    assert again.val_loss_before == pytest.approx(result.val_loss_before)
    once_more = run_demo(tmp_path / "more", seed=0, out=io.StringIO(), **{**TINY_RUN, "max_steps": 3, "max_new_tokens": 4, "stream": False})
    assert once_more.val_loss_after == pytest.approx(again.val_loss_after)
    assert once_more.generated_text == again.generated_text


def test_demo_streams_the_sample(demo_run, capsys):
    result, _, printed = demo_run
    assert "HAMLET:" in printed or "HAMLET:" in capsys.readouterr().out
    assert isinstance(result.generated_text, str)


def test_demo_on_a_slow_machine_fits_the_schedule_and_says_so(monkeypatch, tmp_path):
    """A 3-minute budget on a machine that takes 9 s per step (a clock that advances 9 s per step): 20 steps,
    a short warmup and a full decay (not 20 steps of warmup), and a note naming the steps and a --minutes
    that would do."""
    ticks = itertools.count(0.0, 9.0)
    monkeypatch.setattr(demo, "clock", lambda: next(ticks))
    lrs = []
    schedule = demo.lr_at
    monkeypatch.setattr(demo, "lr_at", lambda *args, **kwargs: lrs.append(schedule(*args, **kwargs)) or lrs[-1])
    printed = io.StringIO()
    run = {**TINY_RUN, "minutes": 3.0, "max_steps": None, "warmup_steps": 20, "stream": False, "max_new_tokens": 2}
    result = run_demo(tmp_path / "slow", seed=0, out=printed, **run)
    peak = 3e-3  # run_demo's default lr
    assert result.steps == len(lrs) == 20
    assert lrs[0] == pytest.approx(peak / 20) and lrs[1] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == pytest.approx(0.1 * peak)
    text = printed.getvalue()
    assert ("note: only 20 training steps fit in 3 min on this machine; the demo needs about 200 before its text "
            "looks like Shakespeare, so expect noise below. Try `xlstm-hf demo --minutes 30`.") in text
    assert "  try         xlstm-hf demo --minutes 30 (only 20 steps fit in 3 min here)" in text
    assert text.index("note: only") < text.index("reloaded")  # before the sample


def test_demo_counts_parameters_with_num_parameters(monkeypatch, tmp_path):
    from xlstm_hf import xLSTMForCausalLM

    monkeypatch.setattr(xLSTMForCausalLM, "num_parameters", lambda self, *args, **kwargs: 123_456_789)
    printed = io.StringIO()
    result = run_demo(tmp_path / "count", seed=0, out=printed, **{**TINY_RUN, "max_steps": 1, "stream": False,
                                                                    "max_new_tokens": 2})
    assert result.num_params == 123_456_789 and "123.5M parameters" in printed.getvalue()


def test_generate_text_streams_to_out(demo_run, capsys):
    _, out_dir, _ = demo_run
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    streamers = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: streamers.append(kwargs["streamer"]) or generate(*args, **kwargs)
    buffer = io.StringIO()
    text = generate_text(model, tokenizer, "ROMEO:", max_new_tokens=6, do_sample=False, out=buffer)
    assert buffer.getvalue() == "ROMEO:" + text + "\n" and capsys.readouterr().out == ""
    assert generate_text(model, tokenizer, "ROMEO:", max_new_tokens=6, do_sample=False) == text
    assert capsys.readouterr().out == "ROMEO:" + text + "\n"  # default: stdout
    assert all(isinstance(streamer, TextStreamer) for streamer in streamers) and len(streamers) == 2


def test_generate_command_prints_text(demo_run, capsys):
    _, out_dir, _ = demo_run
    assert cli.main(["generate", "--model", str(out_dir), "--prompt", "ROMEO:", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:")


def test_generate_command_greedy_is_deterministic(demo_run, capsys):
    _, out_dir, _ = demo_run
    argv = ["generate", "--model", str(out_dir), "--prompt", r"HAMLET:\n", "--max-new-tokens", "8", "--greedy"]
    cli.main(argv + ["--seed", "1"])
    first = capsys.readouterr().out
    cli.main(argv + ["--seed", "2"])
    assert capsys.readouterr().out == first
    assert first.startswith("HAMLET:\n")


def test_generate_command_uses_shipped_tokenizer_when_folder_has_none(demo_run, tmp_path, capsys):
    import shutil

    _, out_dir, _ = demo_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(out_dir / name, bare / name)
    assert cli.main(["generate", "--model", str(bare), "--max-new-tokens", "4", "--greedy"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ROMEO:")
    assert "shipped GPT-2 tokenizer" in captured.err


@pytest.mark.slow
def test_full_demo_command(tmp_path, capsys):
    """The real demo model (xLSTM[7:1], 8 blocks, 256 wide) through the CLI for half a minute."""
    out_dir = tmp_path / "xlstm-demo"
    assert cli.main(["demo", "--output-dir", str(out_dir), "--minutes", "0.5", "--max-new-tokens", "30"]) == 0
    out = capsys.readouterr().out
    assert "xLSTM[7:1]" in out and "summary:" in out
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.layout == "xLSTM[7:1]" and model.config.slstm_at == [4]
