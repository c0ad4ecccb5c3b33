"""Kernel backends: which implementation of each cell the model calls (name -> functions).

`config.kernel_backend`, overridden by the environment variable `XLSTM_KERNEL_BACKEND`, is one of
- "torch": the PyTorch reference in `cells.py`, on any device;
- "triton": the fused kernels in `xlstm_hf.kernels`, for CUDA tensors (or for CPU tensors under Triton's
  interpreter, `TRITON_INTERPRET=1`, which is how they are tested without a GPU);
- "auto" (default): "triton" for CUDA tensors when Triton is importable, "torch" otherwise.

Every backend provides the same operations with the reference's signatures: "mlstm_chunkwise",
"mlstm_parallel", "mlstm_step" and "slstm". A backend without its own version of an operation uses the
reference (Triton has no quadratic parallel form: its chunkwise kernel serves).
"""

import functools
import importlib.util
import os

import torch

from .cells import mlstm_chunkwise, mlstm_parallel, mlstm_step, slstm_recurrent
from .configuration_xlstm import KERNEL_BACKENDS

ENV_VAR = "XLSTM_KERNEL_BACKEND"

TORCH_OPS = {
    "mlstm_chunkwise": mlstm_chunkwise,
    "mlstm_parallel": mlstm_parallel,
    "mlstm_step": mlstm_step,
    "slstm": slstm_recurrent,
}


@functools.cache
def triton_ops() -> dict:
    """The Triton operations (imported on first use, so Triton stays optional). Absolute imports: a
    checkpoint's copied code (trust_remote_code) runs without the installed package and its kernels."""
    try:  # a try block, which transformers' import check for copied code skips: the kernels are optional
        from xlstm_hf.kernels.mlstm_chunkwise import mlstm_chunkwise_triton
        from xlstm_hf.kernels.mlstm_step import mlstm_step_triton
        from xlstm_hf.kernels.slstm import slstm_recurrent_triton
    except ImportError as error:
        raise ValueError("kernel_backend='triton' needs the xlstm_hf package and triton (pip install xlstm-hf[triton])") from error

    return {
        "mlstm_chunkwise": mlstm_chunkwise_triton,
        "mlstm_parallel": mlstm_chunkwise_triton,
        "mlstm_step": mlstm_step_triton,
        "slstm": slstm_recurrent_triton,
    }


def triton_available() -> bool:
    """Triton and our kernels are importable (the kernels are absent where only a checkpoint's copied
    model code runs, without the xlstm_hf package)."""
    try:
        return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("xlstm_hf.kernels") is not None
    except ModuleNotFoundError:
        return False


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend ("torch" or "triton") that `name` means for tensors on `device`; clear errors for
    a backend that cannot run there."""
    name = os.environ.get(ENV_VAR) or name
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ValueError("kernel_backend='triton' needs the `triton` package (pip install triton) and xlstm_hf's kernels")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"kernel_backend='triton' runs on CUDA tensors, got {device.type} tensors "
                "(set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter, for testing)"
            )
    return name


def get_ops(name: str, device: torch.device) -> dict:
    """The operations of backend `name` for tensors on `device` (see the module docstring)."""
    return triton_ops() if resolve_backend(name, device) == "triton" else TORCH_OPS
