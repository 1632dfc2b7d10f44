"""Triton where it can be imported, for the CUDA kernels of numgan.conv and numgan.mog_triton (issue 4).

Triton ships with torch's Linux CUDA wheels; elsewhere, or if it fails to load, ``triton`` and ``tl`` are None
and those modules run their torch paths. ``INTERPRET``: ``TRITON_INTERPRET=1`` was set when numgan was
imported. ``triton.jit`` reads it when it decorates a kernel, i.e. at import, and then runs the kernels in its
CPU interpreter on CPU tensors (the tests use it); reading it later would not match the decorated kernels.
"""
import contextlib
import os

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no Triton", never a crash at import
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_guard(t):
    """The CUDA device of ``t`` made current for a kernel launch (Triton launches on the current device)."""
    import torch
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
