"""Shared fixtures: tiny xLSTM models of both block designs with every weight randomised.

The official initialisation leaves gate weights and the sLSTM recurrent matrices at zero, which would
hide bugs in the recurrences, so tests perturb every parameter.

`design` is a fixture parametrised over the two block designs ("paper": mLSTM + sLSTM blocks; "large":
the mLSTM-only block of xLSTM-7B); `model` is the tiny model of that design, so every test that takes
`model` runs for both. Tests that build their own models take `design` and pass it to `tiny_config` /
`tiny_model` (sLSTM-specific overrides such as `slstm_at` only for the paper design: see `paper_only`).
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter; it must be on before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import xlstm_hf  # noqa: E402,F401  (registers the Auto classes)
from xlstm_hf import xLSTMConfig, xLSTMForCausalLM  # noqa: E402

DESIGNS = ("paper", "large")

#: the tiny model of each design (97-token vocabulary, 32 wide, chunk_size 8 so that tests cross chunks)
TINY_CONFIGS = {
    # xLSTM[3:1]: blocks m s m m
    "paper": dict(vocab_size=97, hidden_size=32, num_blocks=4, slstm_at=[1], mlstm_num_heads=2, slstm_num_heads=2,
                  chunk_size=8, bos_token_id=0, eos_token_id=None, pad_token_id=0),
    # xLSTM-7B's block at toy size: q/k 16 wide (8 per head), v 32 (16 per head), SwiGLU feed-forward 88 wide,
    # soft-capped gates and logits
    "large": dict(block_design="large", vocab_size=97, hidden_size=32, num_blocks=3, mlstm_num_heads=2,
                  qk_dim_factor=0.5, v_dim_factor=1.0, mlstm_round_up_to=8, gate_soft_cap=15.0, logits_soft_cap=30.0,
                  ffn_act_fn="swish", ffn_proj_factor=2.667, ffn_round_up_to=8, chunk_size=8,
                  bos_token_id=0, eos_token_id=None, pad_token_id=0),
}


def tiny_config(design: str = "paper", **overrides) -> xLSTMConfig:
    kwargs = dict(TINY_CONFIGS[design])
    kwargs.update(overrides)
    return xLSTMConfig(**kwargs)


def paper_only(design: str, **overrides) -> dict:
    """`overrides` for the paper design, nothing for the large one (e.g. `slstm_at`, which it rejects)."""
    return overrides if design == "paper" else {}


def randomise_(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (matrices are redrawn), keeping the model in a sensible regime.

    The large design's input gates start at bias -10 (xLSTM-7B's init), where the mLSTM cell's output is
    ~exp(-10) of what it would be and tests could not see the cell; their biases are redrawn around 0."""
    gen = torch.Generator().manual_seed(seed)
    large = getattr(getattr(model, "config", None), "block_design", "paper") == "large"
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if (p.dim() > 1 and "conv" not in name) or (large and name.endswith("mlstm.igate.bias")):
                p.copy_(noise * scale)
            else:
                p.add_(noise * scale)
    return model


def tiny_model(seed: int = 0, dtype=torch.float32, design: str = "paper", scale: float = 0.3,
               **overrides) -> xLSTMForCausalLM:
    torch.manual_seed(seed)
    model = xLSTMForCausalLM(tiny_config(design, **overrides))
    return randomise_(model, scale=scale, seed=seed).to(dtype).eval()


@pytest.fixture(params=DESIGNS)
def design(request) -> str:
    """Each block design in turn ("paper", "large")."""
    return request.param


@pytest.fixture
def model(design):
    return tiny_model(design=design)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`xlstm-hf ARGV` in this process: (exit code, stdout, stderr) of that call alone."""
    from xlstm_hf import cli

    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def cpu_kernels_off(monkeypatch):
    """xlstm_hf's fused CPU kernels off for the test (as in a checkpoint's copied code, which runs without
    them): the PyTorch operations that are their fallback, to compare bitwise with such code."""
    from xlstm_hf.kernels import cpu

    monkeypatch.setenv(cpu.ENV_VAR, "0")
    cpu.library.cache_clear()
    yield
    monkeypatch.undo()
    cpu.library.cache_clear()
