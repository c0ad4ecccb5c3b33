"""Shared fixtures: tiny xLSTM models with every weight randomised.

The official initialisation leaves gate weights and the sLSTM recurrent matrices at zero, which would
hide bugs in the recurrences, so tests perturb every parameter.
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter; it must be on before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import xlstm_hf  # noqa: E402,F401  (registers the Auto classes)
from xlstm_hf import xLSTMConfig, xLSTMForCausalLM  # noqa: E402


def tiny_config(**overrides) -> xLSTMConfig:
    kwargs = dict(vocab_size=97, hidden_size=32, num_blocks=4, slstm_at=[1], mlstm_num_heads=2, slstm_num_heads=2,
                  chunk_size=8, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    kwargs.update(overrides)
    return xLSTMConfig(**kwargs)


def randomise_(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (matrices are redrawn), keeping the model in a sensible regime."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if p.dim() > 1 and "conv" not in name:
                p.copy_(noise * scale)
            else:
                p.add_(noise * scale)
    return model


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> xLSTMForCausalLM:
    torch.manual_seed(seed)
    model = xLSTMForCausalLM(tiny_config(**overrides))
    return randomise_(model, seed=seed).to(dtype).eval()


@pytest.fixture
def model():
    return tiny_model()
