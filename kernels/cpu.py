"""Fused CPU kernels in C (`cpu_kernels.c`): built on first use, loaded with ctypes.

- The sLSTM's per-step work. In eager PyTorch an sLSTM time step is a batched matmul (h_{t-1} R) plus ~15
  pointwise operations on a few hundred values each, and it is their launch overhead, not arithmetic, that
  a step costs (~70 of the 125M model's ~90 us per step on a 2-core VM). The C kernels do a step's pointwise
  work, forward or backward, in one call; the matmul stays PyTorch's.
- The mLSTM block's causal convolution without gradients (prefill): one pass over its input instead of
  K + 1 (`causal_conv`).
- Decoding. The mLSTM state update with its read-out in one pass over C (`mlstm_step_update`: PyTorch
  needs three), and `matvec`, a matrix times up to 8 vectors that reads the matrix once (MKL's GEMM
  reaches a third to half of the memory bandwidth with so few rows). Both are custom operators, so a
  compiled decode step calls them as opaque kernels.

Each computes the formulas of the PyTorch code it replaces (`cells.slstm_pointwise`,
`slstm_autograd.slstm_backward`, `cells.mlstm_step`, `F.linear`), which remains the fallback and the
oracle of the tests (`tests/test_slstm_autograd.py`, `tests/test_cpu_kernels.py`).

Built with the system's C compiler (`$CC`, else `cc`), `-O3 -march=native`, OpenMP (the libgomp that torch
has loaded: one thread pool for both) and glibc's vector math library on x86-64 Linux, into a cache folder (`$XLSTM_HF_CACHE`, else `$XDG_CACHE_HOME/xlstm_hf`, else
`~/.cache/xlstm_hf`) under a name that hashes the source, the flags and this CPU's instruction-set flags
(a home folder shared by different machines gets one build per CPU kind): about a second, once.
`XLSTM_CPU_KERNELS=0` turns them off; without a compiler, or when the build fails, the PyTorch steps run,
with a warning once.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

ENV_VAR = "XLSTM_CPU_KERNELS"
SOURCE = Path(__file__).with_name("cpu_kernels.c")


def _cpu_fingerprint() -> str:
    """The CPU's instruction-set flags (the build uses -march=native), or the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("XLSTM_HF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xlstm_hf"
    return Path(base)


def _build() -> Path:
    """Compile cpu_kernels.c (if not cached) and return the shared library's path."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found; set CC)")
    vector_math = platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc"
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
    libraries = ["-lmvec", "-lm"] if vector_math else ["-lm"]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags + libraries).encode(), compiler.encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"cpu_kernels-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and rename: concurrent builds (DDP ranks, test workers) never see half a file
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out), *libraries],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
            os.replace(out, path)
    return path


_int, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def library():
    """The loaded kernels as {dtype: {name: function}}, or None where they are off or failed to build
    (said once)."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except Exception as error:  # any failure leaves the PyTorch steps in place
        warnings.warn(f"xlstm_hf's fused CPU kernels are unavailable ({error}); using PyTorch operations instead "
                      f"(slower; set {ENV_VAR}=0 to silence this)", stacklevel=2)
        return None
    signatures = {
        "slstm_forward_step": [_int, _int, _int, _ptr, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                               _ptr, _int, _int, _ptr],
        "slstm_backward_step": [_int, _int, _int, _ptr, _int, _int, _ptr, _ptr, _ptr, _int, _ptr, _int, _ptr, _ptr],
        "mlstm_step_update": [_int, _int, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr],
        "matvec": [_int, _int, _int, _ptr, _ptr, _ptr, _ptr],
        "causal_conv": [_int, _int, _int, _int, _ptr, _int, _int, _ptr, _ptr, _ptr, _ptr],
    }
    kernels = {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        kernels[dtype] = {}
        for name, argtypes in signatures.items():
            function = getattr(lib, f"{name}_{suffix}")
            function.argtypes, function.restype = argtypes, None
            kernels[dtype][name] = function
    return kernels


@torch.compiler.assume_constant_result  # a compiled graph takes it as a constant (no ctypes traced)
def built() -> bool:
    """The kernels are on and built (builds them on the first call)."""
    return library() is not None


def available(tensor: torch.Tensor) -> bool:
    """The fused kernels can take `tensor` (a CPU float32/float64 tensor) and have been built."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64) and built()


def slstm_forward_loop(raw: torch.Tensor, recurrent_kernel: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor,
                       ns: torch.Tensor, ms: torch.Tensor, keep: torch.Tensor | None) -> None:
    """The sLSTM forward over T steps, in place.

    raw: (NH, T, B, 4, DH) contiguous, holding x + b; each step adds h_{t-1} R into its slice (so raw ends as
    the pre-activations). hs: (NH, T+1, B, DH) contiguous with h_0 in slot 0; receives h_t in slot t.
    cs, ns, ms: (NH, S, B, DH) contiguous with the initial state in slot 0; S = T+1 keeps every step's
    state (for a backward pass), S = 2 alternates two slots (inference; the final state ends in slot T % 2).
    recurrent_kernel: (NH, DH, 4, DH); keep: (T, B) bool contiguous, or None."""
    forward = library()[raw.dtype]["slstm_forward_step"]
    NH, T, B, G, DH = raw.shape
    r = recurrent_kernel.reshape(NH, DH, G * DH)
    h = hs[:, 0].clone(memory_format=torch.contiguous_format)  # h_{t-1} for the matmul (the kernel writes each new h here)
    hr = raw.new_empty(NH, B, G * DH)  # h_{t-1} R
    size = raw.element_size()
    raw_head, h_head, state_head = raw.stride(0), hs.stride(0), cs.stride(0)
    slots, slot = cs.shape[1], B * DH * size  # bytes between consecutive slots of a state buffer
    raw_ptr, h_ptr, c_ptr, n_ptr, m_ptr = (t.data_ptr() for t in (raw, hs, cs, ns, ms))
    keep_ptr = None if keep is None else keep.data_ptr()
    h_now, hr_ptr = h.data_ptr(), hr.data_ptr()
    for t in range(T):
        torch.bmm(h, r, out=hr)
        prev, new = (t % slots) * slot, ((t + 1) % slots) * slot
        forward(NH, B, DH, raw_ptr + t * B * G * DH * size, raw_head, hr_ptr, h_now, h_ptr + t * slot, c_ptr + prev, n_ptr + prev,
                m_ptr + prev, h_ptr + (t + 1) * slot, c_ptr + new, n_ptr + new, m_ptr + new, h_head, state_head,
                None if keep_ptr is None else keep_ptr + t * B)


def slstm_backward_step(coef: torch.Tensor, j: int, dh: torch.Tensor, dcn: torch.Tensor, d_raw: torch.Tensor,
                        t: int, d_out: torch.Tensor, dh_prev: torch.Tensor, keep: torch.Tensor | None) -> None:
    """One backward step t (coefficient block step j) in place: writes d_raw[:, t] and dh_prev, and moves dcn
    (2, NH, B, DH) to the previous step. coef: (9, NH, L, B, DH) contiguous; dh, dh_prev: (NH, B, DH)
    contiguous; d_raw: (NH, T, B, 4, DH) contiguous; d_out: (NH, T, B, DH) contiguous; keep: (T, B) bool
    contiguous or None. (Same as the PyTorch step in `slstm_autograd.slstm_backward`.)"""
    backward = library()[coef.dtype]["slstm_backward_step"]
    _, NH, L, B, DH = coef.shape
    size = coef.element_size()
    d_out_prev = d_out.data_ptr() + (t - 1) * B * DH * size if t > 0 else None
    backward(NH, B, DH, coef.data_ptr() + j * B * DH * size, coef.stride(0), coef.stride(1), dh.data_ptr(),
             dcn.data_ptr(), d_raw.data_ptr() + t * d_raw.stride(1) * size, d_raw.stride(0), d_out_prev,
             d_out.stride(0), dh_prev.data_ptr(), None if keep is None else keep.data_ptr() + t * B)


# Decoding, as custom operators (opaque kernels inside a compiled decode step; fake implementations give
# their shapes to the compiler).


@torch.library.custom_op("xlstm_hf::mlstm_step_update", mutates_args={"C"})
def mlstm_step_update(C: torch.Tensor, q: torch.Tensor, gain_k: torch.Tensor, v: torch.Tensor,
                      decay: torch.Tensor) -> torch.Tensor:
    """In place C <- decay C + gain_k v^T, and returns q^T C (of the new C), in one pass over C.
    C: (B, NH, DK, DV) contiguous; q, gain_k: (B, NH, DK); v: (B, NH, DV); decay: (B, NH); one dtype.
    Returns (B, NH, DV)."""
    B, NH, DK, DV = C.shape
    q, gain_k, v, decay = (t.contiguous() for t in (q, gain_k, v, decay))
    num = v.new_empty(B, NH, DV)
    library()[C.dtype]["mlstm_step_update"](B * NH, DK, DV, C.data_ptr(), q.data_ptr(), gain_k.data_ptr(),
                                            v.data_ptr(), decay.data_ptr(), num.data_ptr())
    return num


@mlstm_step_update.register_fake
def _(C, q, gain_k, v, decay):
    return v.new_empty(v.shape)


#: the most rows `matvec` takes (the C kernel keeps 8 accumulators)
MATVEC_ROWS = 8


@torch.library.custom_op("xlstm_hf::matvec", mutates_args=())
def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b for x (..., I) of at most MATVEC_ROWS rows, W (O, I), b (O,) or None; one dtype.
    Reads W once for all rows."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    R, (O, I) = rows.shape[0], weight.shape
    if R > MATVEC_ROWS:
        raise ValueError(f"matvec takes at most {MATVEC_ROWS} rows, got {R}")
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = rows.new_empty(R, O)
    library()[x.dtype]["matvec"](R, I, O, rows.data_ptr(), weight.data_ptr(),
                                 None if bias is None else bias.data_ptr(), y.data_ptr())
    return y.view(*x.shape[:-1], O)


@matvec.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("xlstm_hf::causal_conv", mutates_args=())
def causal_conv(x: torch.Tensor, window: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The causal depthwise convolution y_t = b + sum_j w_j x_{t-K+1+j} (inputs before the sequence: the
    window, or zeros), in one pass. x: (B, T, F), unit stride along F; window: (B, K-1, F) or None;
    weight: (F, 1, K) as nn.Conv1d's; bias: (F,); one dtype. Returns y (B, T, F) contiguous."""
    B, T, F = x.shape
    K = weight.shape[-1]
    if x.stride(2) != 1:
        x = x.contiguous()
    window = None if window is None or K == 1 else window.contiguous()
    w = weight[:, 0, :].t().contiguous()  # (K, F)
    bias = bias.contiguous()
    y = x.new_empty(B, T, F)
    library()[x.dtype]["causal_conv"](B, T, F, K, x.data_ptr(), x.stride(0), x.stride(1),
                                      None if window is None else window.data_ptr(), w.data_ptr(), bias.data_ptr(),
                                      y.data_ptr())
    return y


@causal_conv.register_fake
def _(x, window, weight, bias):
    return x.new_empty(x.shape)
