"""What the Triton kernels share: the matmul precision policy and how a kernel is launched.

Matmul precision. bf16 and fp16 inputs take tensor-core `tl.dot` (operands in the input dtype, fp32
accumulation; states, gates and all other math stay fp32). fp32 inputs get exact fp32 products
(`input_precision="ieee"`), or TF32 when the user asks PyTorch for it the usual way,
`torch.set_float32_matmul_precision("high")` (or "medium").

Launch configurations. On a GPU each kernel is autotuned (`triton.autotune`, with its candidates pruned to
those that fit the shapes) per head dims and dtype; the choice is cached by Triton. Under the interpreter
(the tests) a fixed default configuration is used: it cannot time anything, and is slow.
"""

import os

import torch
import triton
import triton.language as tl

#: True under Triton's CPU interpreter (tests): one launch configuration, no autotuning
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_HALF = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_precision(dtype: torch.dtype) -> dict:
    """The kernels' DOT_DTYPE / PRECISION constexprs for inputs of `dtype` (see the module docstring)."""
    if dtype in _HALF:
        return {"DOT_DTYPE": _HALF[dtype], "PRECISION": "ieee"}  # (the precision only applies to fp32 operands)
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return {"DOT_DTYPE": tl.float32, "PRECISION": "tf32" if tf32 else "ieee"}


@triton.jit
def mma(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation, the operands rounded to DOT_DTYPE (bf16/fp16: tensor cores)."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


def launch(kernel, tuned, grid, default: dict, *args, **constexprs):
    """Run `kernel` on `args`: under the interpreter with the `default` configuration, on a GPU with the one
    `tuned` (its `triton.autotune` wrapper) picked. grid(config) -> the launch grid."""
    if INTERPRET:
        kernel[grid(default)](*args, **constexprs, **default)
    else:
        tuned[grid](*args, **constexprs)
