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


def compile_offline(fn, types: dict, constexprs: dict, arch: int = 90, num_warps: int = 4, aligned=None):
    """Compile the Triton kernel ``fn`` for an NVIDIA GPU of compute capability ``arch`` (90: H100) without
    one: Triton bundles ptxas, so this runs on any machine with a Linux Triton install (tests and
    benchmarks/sass_mog_triton.py use it to check and inspect kernels where no GPU is at hand).

    ``types`` maps each runtime argument to a Triton type string ("*fp32", "i32", "fp32", ...),
    ``constexprs`` each constexpr argument to its value. ``aligned`` names the arguments that a launch would
    pass as multiples of 16 (Triton's JIT specialises on that: 16-byte-aligned pointers, integers divisible
    by 16); default: every pointer argument, as torch's allocations are. (The JIT also turns an integer
    argument equal to 1 into a constant: pass such an argument in ``constexprs``.) Returns Triton's compiled
    kernel, whose ``asm`` holds "ptx" and "cubin". Raises whatever Triton raises when the kernel does not
    compile, and NotImplementedError where this Triton's ahead-of-time API differs from 3.8's.
    """
    missing = set(fn.arg_names) - set(types) - set(constexprs)
    if missing:
        raise ValueError(f"no type or value for the arguments {sorted(missing)} of {fn.__name__}")
    extra, both = (set(types) | set(constexprs)) - set(fn.arg_names), set(types) & set(constexprs)
    if extra or both:
        raise ValueError(f"{fn.__name__}: {sorted(extra)} are not its arguments" if extra else
                         f"{fn.__name__}: {sorted(both)} given both a type and a constant value")
    try:   # Triton's ahead-of-time entry points (checked with Triton 3.8, the version torch 2.14 ships)
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        raise NotImplementedError(f"this Triton ({triton.__version__}) has no ahead-of-time compiler API: {e}")
    signature = {name: types[name] if name in types else "constexpr" for name in fn.arg_names}
    if aligned is None:
        aligned = [name for name, t in types.items() if t.startswith("*")]
    unknown = set(aligned) - set(types)
    if unknown:
        raise ValueError(f"aligned names no runtime argument of {fn.__name__}: {sorted(unknown)}")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    try:
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    except TypeError as e:
        raise NotImplementedError(f"this Triton ({triton.__version__}) takes other ASTSource arguments: {e}")
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
