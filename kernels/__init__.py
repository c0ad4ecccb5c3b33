"""Fused kernels for the xLSTM cells (installed as `xlstm_hf.kernels`): Triton for GPUs, C for CPUs.

Each kernel computes the same function as its PyTorch reference in `xlstm_hf/cells.py` and has that
reference's signature; `xlstm_hf/backends.py` chooses between them. Nothing is imported here, so that
`xlstm_hf` works without Triton: the modules are imported when the "triton" backend is first used.

    slstm.py            sLSTM recurrence over time, forward + backward   (ref. cells.slstm_recurrent)
    mlstm_chunkwise.py  mLSTM chunkwise, forward + backward              (ref. cells.mlstm_chunkwise)
    mlstm_step.py       mLSTM decode step, in place                      (ref. cells.mlstm_step)
    cpu.py, cpu_kernels.c  CPU kernels in C: sLSTM steps, mLSTM decode update, matvec, causal conv
"""
