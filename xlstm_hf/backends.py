"""Kernel backends: which implementation of each cell the model calls (name -> functions).

`config.kernel_backend`, overridden by the environment variable `XLSTM_KERNEL_BACKEND` (which says so once), is one of
- "torch": the PyTorch reference in `cells.py`, on any device; its sLSTM with the backward over time
  written out (`slstm_autograd.slstm_recurrent_bptt`: the reference's gradients, ~1.8x faster), its
  chunkwise mLSTM trained through the backward that recomputes chunks from a few kept states
  (`mlstm_chunkwise_training`: the same gradients, a fraction of the memory);
- "triton": the fused kernels in `xlstm_hf.kernels`, for CUDA tensors (or for CPU tensors under Triton's
  interpreter, `TRITON_INTERPRET=1`, which is how they are tested without a GPU);
- "auto" (default): "triton" for CUDA tensors when Triton is importable (else "torch", with a warning once),
  "torch" for other tensors.

Every backend provides the same operations with the reference's signatures: "mlstm_chunkwise",
"mlstm_parallel", "mlstm_step" and "slstm". A backend without its own version of an operation uses the
reference (Triton has no quadratic parallel form: its chunkwise kernel serves).

Inference can run its per-token work through `torch.compile` (`config.compile_inference`): each block's
one-token decode step (`decode_call`; the compiled step fuses the small per-token operations, and its
matrix-vector products, `linear`, become loops that stream the weights at memory bandwidth). The eager
path is the fallback. (The sLSTM's per-step update inside a sequence stays eager: compiled, each step's
call costs more than its few small operations.)
"""

import functools
import importlib.util
import inspect
import os
import warnings

import torch
import torch.nn.functional as F

from .cells import (mlstm_chunkwise, mlstm_chunkwise_recompute, mlstm_one_chunk, mlstm_parallel, mlstm_step,
                    slstm_recurrent)
from .configuration_xlstm import KERNEL_BACKENDS
from .slstm_autograd import slstm_recurrent_bptt

try:  # (a try block: transformers' import check for a checkpoint's copied code skips it; the kernels are optional)
    from xlstm_hf.kernels import cpu as cpu_kernels
except ImportError:  # only the checkpoint's copied model code, without the xlstm_hf package
    cpu_kernels = None

ENV_VAR = "XLSTM_KERNEL_BACKEND"
COMPILE_ENV_VAR = "XLSTM_COMPILE"
#: compile_inference="auto" compiles the per-token work of models at least this wide
AUTO_COMPILE_MIN_WIDTH = 512

def fused_cpu(*tensors: torch.Tensor) -> bool:
    """xlstm_hf's fused CPU kernels (`kernels/cpu.py`) can take these tensors: on, built, CPU tensors of one
    dtype, float32 or float64, none needing gradients."""
    return (cpu_kernels is not None and not torch.compiler.is_exporting()
            and all(t.dtype == tensors[0].dtype for t in tensors)
            and cpu_kernels.available(tensors[0])
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _fused_state_update(C, q, gain_k, v, decay):
    """The decode step's in-place C update and read-out by the fused CPU kernel, where it applies."""
    if C.is_contiguous() and fused_cpu(C, q, gain_k, v, decay):
        return torch.ops.xlstm_hf.mlstm_step_update(C, q, gain_k, v, decay)
    return None


def mlstm_step_cpu(q, k, v, i, f, state, eps=1e-6):
    """`cells.mlstm_step`, whose in-place state update and read-out (one pass over C instead of three) is
    the fused CPU kernel where it applies: batch decoding reads and writes every row's C each step."""
    return mlstm_step(q, k, v, i, f, state, eps, fused_update=_fused_state_update)


def mlstm_chunkwise_training(q, k, v, i, f, initial_state=None, output_final_state=False, eps=1e-6, chunk_size=64,
                             resets=None):
    """`cells.mlstm_chunkwise`, whose backward over several chunks recomputes each chunk from the states
    kept at every ceil(sqrt(chunks))-th chunk boundary (`cells.mlstm_chunkwise_recompute`): training keeps
    the inputs and a few states instead of every chunk's state and weights (125M model, T=512: ~1.2 MB
    less per token) at the same speed on CPU (B=1, T=512, DK=DV=384, fwd+bwd: 43 vs 43 ms). One chunk
    (and inference) takes the plain loop: from a zero state without a final one, that is the parallel
    form, with no state to keep at all (small models, B=64, T=64: 1.6x faster than the recomputing form)."""
    if q.shape[-2] <= chunk_size:
        return mlstm_chunkwise(q, k, v, i, f, initial_state, output_final_state, eps, chunk_size, resets=resets)
    return mlstm_chunkwise_recompute(q, k, v, i, f, initial_state, output_final_state, eps, chunk_size,
                                     state_every=None, resets=resets)


TORCH_OPS = {
    "mlstm_chunkwise": mlstm_chunkwise_training,
    "mlstm_parallel": mlstm_parallel,
    "mlstm_step": mlstm_step_cpu,
    # the reference's function and gradients, with the backward over time written out (no autograd replay
    # of ~15 small operations per step)
    "slstm": slstm_recurrent_bptt,
}


#: under torch.export (and the exporters built on it: ONNX, ExecuTorch): standard torch operations only, and no
#: loop whose length depends on the sequence length (export would fix it to the example's): the chunkwise mLSTM
#: as one chunk (memory quadratic in T), the sLSTM's steps as a `scan`, the steps without in-place updates
EXPORT_OPS = {
    "mlstm_chunkwise": mlstm_one_chunk,
    "mlstm_parallel": mlstm_parallel,
    "mlstm_step": mlstm_step,
    "slstm": slstm_recurrent,
}


_compile_failed = False  # set by the first failed compile: everything runs eagerly from then on
_said: set = set()  # the warnings already given (each is given once per process)


def warn_once(message: str) -> None:
    """`warnings.warn(message)` the first time this process sees `message`."""
    if message not in _said:
        _said.add(message)
        warnings.warn(message, stacklevel=3)


def _env_override(var: str, setting) -> str | None:
    """The value of environment variable `var` if set; says once that it overrides the config's `setting`."""
    value = os.environ.get(var)
    if value:
        warn_once(f"{var}={value} overrides the config's setting ({setting!r})")
    return value or None


@functools.cache
def triton_ops() -> dict:
    """The Triton operations (imported on first use, so Triton stays optional). Absolute imports: a
    checkpoint's copied code (trust_remote_code) runs without the installed package and its kernels."""
    try:  # a try block, which transformers' import check for copied code skips: the kernels are optional
        from xlstm_hf.kernels.mlstm_chunkwise import mlstm_chunkwise_triton
        from xlstm_hf.kernels.mlstm_step import mlstm_step_triton
        from xlstm_hf.kernels.slstm import slstm_recurrent_triton
    except ImportError as error:
        raise ImportError(f"kernel_backend='triton' needs the xlstm_hf package and triton ({error})") from error

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
    name = _env_override(ENV_VAR, name) or name
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        if triton_available():
            return "triton"
        warn_once("kernel_backend='auto' runs the PyTorch reference cells on CUDA: Triton or xlstm_hf's kernels are "
                  "not importable (pip install triton); the fused kernels are much faster")
        return "torch"
    if name == "triton":
        if not triton_available():
            raise ImportError("kernel_backend='triton' needs the `triton` package (pip install triton) and xlstm_hf's kernels")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"kernel_backend='triton' runs on CUDA tensors, got {device.type} tensors "
                "(set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter, for testing)"
            )
    return name


def get_ops(name: str, device: torch.device) -> dict:
    """The operations of backend `name` for tensors on `device` (see the module docstring)."""
    if torch.compiler.is_exporting():
        return EXPORT_OPS
    return triton_ops() if resolve_backend(name, device) == "triton" else TORCH_OPS


# --------------------------------------------------------------------------------------------------
# Compiled inference on CPU
# --------------------------------------------------------------------------------------------------


def matvec_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b for a few input rows, written as a multiply-and-sum over the rows of W for each input row
    (in float32).

    x: (..., I) holding a few rows; weight: (O, I); bias: (O,) or None. Returns (..., O) in x's dtype.
    Eagerly this would materialise W * x_r per row; compiled, Inductor fuses the per-row sums into one loop
    that reads each row of W once, streaming W at memory bandwidth, where MKL's GEMM reaches about half of
    it with one row and a sixth to a third with 2-8 rows on CPU.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
    w = weight.to(dtype)
    # one sum per row, not a (rows, O, I) broadcast: the compiler then keeps W's loop outermost
    y = torch.stack([(row * w).sum(-1) for row in x.reshape(-1, x.shape[-1]).to(dtype).unbind(0)])
    if bias is not None:
        y = y + bias.to(dtype)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


#: the fewest input rows for which `linear` takes the fused kernel: with one or two rows MKL's GEMM reads the
#: weights about as fast (Intel VM, 768 x 3072: 0.47 vs 0.53 ms at 1 row, 0.50 vs 0.82 at 2) and at three
#: to eight it falls behind (8 rows: 0.90 vs 0.52 ms; the 50304 x 768 head: 21.0 vs 9.5 ms)
MATVEC_MIN_ROWS = 3
#: the most rows the fused kernel takes (its limit; none without the kernels)
MATVEC_MAX_ROWS = cpu_kernels.MATVEC_ROWS if cpu_kernels is not None else 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, max_rows: int = 1) -> torch.Tensor:
    """`F.linear`, except for a few input rows on CPU without gradients (decoding): with 3 to 8 rows the
    fused kernel `xlstm_hf::matvec`, which reads W once for all of them (`kernels/cpu.py`); where that
    kernel cannot run (not built, bfloat16 weights), inside a compiled decode step with at most `max_rows`
    rows, `matvec_reference` (what the compiler turns into a bandwidth-bound loop; several rows only pay
    off where x is the compiled graph's input, the LM head: inside a block, Inductor would recompute x's
    producers, a layer norm, in that loop for every row of W)."""
    if torch.compiler.is_exporting():  # (a portable program, whose batch size may stay dynamic)
        return F.linear(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type == "cpu" and rows <= max(max_rows, MATVEC_MAX_ROWS):
        fused = fused_cpu(x, weight, *(() if bias is None else (bias,)))
        if fused and MATVEC_MIN_ROWS <= rows <= MATVEC_MAX_ROWS:
            return torch.ops.xlstm_hf.matvec(x, weight, bias)
        if not fused and torch.compiler.is_compiling() and rows <= max_rows:
            return matvec_reference(x, weight, bias)
    return F.linear(x, weight, bias)


def compile_enabled(setting, device: torch.device, hidden_size: int) -> bool:
    """Whether inference runs its per-token work compiled. `setting` is `config.compile_inference`: True,
    False or "auto" (CPU tensors and a model at least `AUTO_COMPILE_MIN_WIDTH` wide, where reading the
    weights dominates a token's cost; a small model is not worth the one-time compile). The environment
    variable `XLSTM_COMPILE` (0 or 1) overrides it; a failed compile turns it off for the process."""
    env = _env_override(COMPILE_ENV_VAR, setting)
    if env is not None:
        setting = env.strip().lower() not in ("0", "false", "no", "off")
    if setting == "auto":
        setting = device.type == "cpu" and hidden_size >= AUTO_COMPILE_MIN_WIDTH
    return bool(setting) and not _compile_failed and not torch.compiler.is_compiling()


#: Inductor inlines cheap elementwise producers (a layer norm, a gating product) into the loops that
#: consume them, which inside a matrix-vector product recomputes them for every row of the weight. In a
#: decode step they are vectors, so materialising every intermediate costs little (sLSTM block: ~2x faster).
INDUCTOR_OPTIONS = {"realize_opcount_threshold": 1, "realize_cpu_opcount_threshold": 1}


def safely_compiled(fn):
    """`torch.compile(fn)`, falling back to `fn` itself if compiling fails (no C++ compiler, an unsupported
    platform): a warning, then eager calls for the rest of the process (`compile_enabled` turns False)."""
    compiled = torch.compile(fn, options=INDUCTOR_OPTIONS)

    def call(*args):
        global _compile_failed
        if not _compile_failed:
            try:
                return compiled(*args)
            except Exception as error:  # the eager function computes the same thing
                _compile_failed = True
                warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); running eagerly", stacklevel=2)
        return fn(*args)

    return call


@functools.cache
def _compiled_forward(module_class: type):
    # one compiled function per module class: Dynamo keeps its compiled graphs per code object, so a
    # shared wrapper (such as GradientCheckpointingLayer's forward) would chain the guards of every block type
    return safely_compiled(inspect.unwrap(module_class.forward))


def decode_call(compiled: bool, module: torch.nn.Module, *args):
    """`module(*args)`, through `torch.compile` when `compiled` (see `safely_compiled`)."""
    return _compiled_forward(type(module))(module, *args) if compiled else module(*args)

