"""The `xlstm-hf` command line and the end-to-end demo (train, save, reload, generate).

The demo runs here with a tiny model (64 wide, 2 blocks, the real GPT-2 vocabulary) for a fixed number
of steps, so the result depends only on the seed; the full-size demo is a slow test.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import xlstm_hf  # noqa: F401  (registers the Auto classes)
from xlstm_hf import cli
from xlstm_hf.demo import DemoResult, evaluate, load_corpus, lr_at, run_demo, split_tokens
from xlstm_hf.tokenization import load_gpt2_tokenizer

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
    assert scripts.get("xlstm-hf") == "xlstm_hf.cli:main"


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


def test_convert_missing_folder_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "missing" in capsys.readouterr().err


def test_convert_calls_the_converter(monkeypatch, tmp_path, capsys):
    import xlstm_hf.conversion.official as official

    calls = []

    def fake_convert(src, out, dtype=None, progress=None):
        calls.append((src, out, dtype))
        return out

    monkeypatch.setattr(official, "convert_official_checkpoint", fake_convert)
    (tmp_path / "src").mkdir()
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert [(str(s), str(o), d) for s, o, d in calls] == [(str(tmp_path / "src"), str(tmp_path / "out"), torch.bfloat16)]
    assert "converted" in capsys.readouterr().out
    calls.clear()
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert calls[0][2] is None  # the checkpoint's own dtype


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
    lrs = [lr_at(step / 100, step, 1.0, warmup_steps=10) for step in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)


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
