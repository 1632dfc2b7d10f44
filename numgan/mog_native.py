"""The MoG SimGA / ConOpt step compiled for the CPU (paper Sec. 5, Alg. 1-2, Eq. 16-17; issue 4).

numgan.mog_fused computes the MoG direction u + gamma J_u^T u with ~100 small batched matrix products.
On a CPU most of their time is the per-call cost of tiny products (16 x 16 weights), not arithmetic.
``mog_native.c`` does the same algebra row by row in portable C. Each 16-wide layer row is one vector
of the compiler's vector extensions. Products are register-blocked and fused with bias, ReLU and mask.
The narrow layers cost what they compute, and the whole TF-1 RMSProp step is one call. See the C file's
header for what differs from mog_fused; the values are the same up to float rounding (tests/test_mog_native.py
compares it with mog_fused and autograd in float64).

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``), with ``-O3 -march=native`` where the compiler accepts it (else ``-mcpu=native``, else no tuning
flag), then ``$NUMGAN_NATIVE_CFLAGS`` if set (extra flags, which come last and so win: e.g. ``-O2``, or
``-DVBYTES=16`` to force a vector width, as tests/test_mog_native_portability.py does to build every width
on one machine). The shared library is cached in ``$NUMGAN_NATIVE_CACHE`` (default
``~/.cache/numgan/native``), keyed by the source, the flags, the compiler and the CPU, and written
atomically. :func:`vector_bytes` says which vector width the build uses (16: SSE2 or NEON, 32: AVX, 64:
AVX-512). Without a compiler :func:`available` is False and
:func:`unavailable_reason` says why; numgan.mog's "auto" engine then uses mog_fused, while asking for
``engine="native"`` raises an error that says how to fix it.

Several seeds run in parallel threads (ctypes releases the GIL): ``threads`` defaults to
``torch.get_num_threads()``, at most one per seed.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .mog_fused import N_PARAMS, X_DIM, Z_DIM

SOURCE = Path(__file__).with_name("mog_native.c")
DTYPES = {torch.float32: "float", torch.float64: "double"}
_BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=fast", "-Wno-psabi"]
_TUNE_FLAGS = (["-march=native"], ["-mcpu=native"], [])  # the first the compiler accepts

_lock = threading.Lock()
_libs: dict = {}
_failures: dict = {}


class NativeUnavailable(RuntimeError):
    """The C engine cannot be built or loaded here (no C compiler, or it failed); the message says why."""


def compiler() -> Optional[list]:
    """The C compiler command: ``$CC`` if set (split like a shell would: "ccache gcc" works), else the first of
    cc, gcc, clang on PATH; None if there is none."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$NUMGAN_NATIVE_CACHE`` or ``~/.cache/numgan/native``."""
    if os.environ.get("NUMGAN_NATIVE_CACHE"):
        return Path(os.environ["NUMGAN_NATIVE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "numgan" / "native"


def _cpu_identity() -> str:
    ident = [platform.machine(), platform.processor()]
    try:  # -march=native code is only valid on the CPU it was built for
        with open("/proc/cpuinfo") as f:
            seen = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen.add(key)
                    ident.append(line.strip())
    except OSError:
        try:  # macOS
            ident.append(subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                        text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return "\n".join(ident)


def _compiler_version(cc: list) -> str:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def extra_flags() -> list:
    """``$NUMGAN_NATIVE_CFLAGS`` split like a shell would (appended to the build flags; part of the cache key);
    NativeUnavailable if it is not shell syntax (an unclosed quote)."""
    try:
        return shlex.split(os.environ.get("NUMGAN_NATIVE_CFLAGS", ""))
    except ValueError as e:
        raise NativeUnavailable(f"NUMGAN_NATIVE_CFLAGS={os.environ['NUMGAN_NATIVE_CFLAGS']!r} cannot be split into "
                                f"flags ({e}); fix or unset it") from e


def _build(dtype: torch.dtype) -> Path:
    """The compiled library for ``dtype``: from the cache, else built (flags tried in order of _TUNE_FLAGS)."""
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (looked for $CC, cc, gcc, clang); install one "
                                "(e.g. `apt install gcc`, `xcode-select --install`) or use engine='fused'")
    real = DTYPES[dtype]
    defines = [f"-DREAL={real}"] + (["-DREAL_IS_DOUBLE"] if real == "double" else [])
    src = SOURCE.read_bytes()
    out_dir = cache_dir()
    version, cpu, extra = _compiler_version(cc), _cpu_identity(), extra_flags()
    candidates = []
    for tune in _TUNE_FLAGS:
        flags = _BASE_FLAGS + tune + defines + extra
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), " ".join(cc).encode(), version.encode(),
                                         cpu.encode()])).hexdigest()[:16]
        candidates.append((tune, flags, out_dir / f"mog_native-{real}-{key}.so"))
    for _, _, lib in candidates:  # built before (possibly with a later flag set: don't retry failing flags)
        if lib.exists():
            return lib
    errors = []
    for tune, flags, lib in candidates:
        tmp = None
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
        except OSError as e:
            raise NativeUnavailable(f"cannot write to the build cache {out_dir} ({e}); set NUMGAN_NATIVE_CACHE "
                                    "to a writable folder") from e
        try:
            res = subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode == 0:
                os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same file
                return lib
            errors.append(f"{' '.join(tune) or '(no tuning flag)'}: {res.stderr.strip()[-2000:]}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(tune) or '(no tuning flag)'}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    hint = (f" (with NUMGAN_NATIVE_CFLAGS={os.environ['NUMGAN_NATIVE_CFLAGS']!r}: unset it to build with the "
            "defaults)") if extra else ""
    raise NativeUnavailable(f"compiling {SOURCE.name} with {' '.join(cc)} failed{hint}:\n" + "\n".join(errors))


def library(dtype: torch.dtype = torch.float32) -> ctypes.CDLL:
    """The compiled engine for ``dtype`` (float32 or float64), built on first use; NativeUnavailable if it
    cannot be built (the error is remembered, so a failing build is tried once per process)."""
    if dtype not in DTYPES:
        raise ValueError(f"the native MoG engine computes in float32 or float64, got {dtype}")
    with _lock:
        if dtype in _libs:
            return _libs[dtype]
        if dtype in _failures:
            raise NativeUnavailable(_failures[dtype])
        try:
            lib = ctypes.CDLL(str(_build(dtype)))
        except NativeUnavailable as e:
            _failures[dtype] = str(e)
            raise
        except OSError as e:
            _failures[dtype] = f"loading the compiled MoG engine failed: {e}"
            raise NativeUnavailable(_failures[dtype]) from e
        real = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.mog_work_bytes.argtypes, lib.mog_work_bytes.restype = [i], ctypes.c_size_t
        lib.mog_vector_bytes.argtypes, lib.mog_vector_bytes.restype = [], i
        lib.mog_direction.argtypes = [i, i, p, p, p, real, p, p, p]
        lib.mog_direction.restype = None
        lib.mog_step.argtypes = [i, i, p, p, p, p, real, real, real, real, real, p, p, p]
        lib.mog_step.restype = None
        lib.mog_jacobian.argtypes = [i, p, p, p, i, i, p, p]
        lib.mog_jacobian.restype = None
        _libs[dtype] = lib
        return lib


def vector_bytes(dtype: torch.dtype = torch.float32) -> int:
    """The width of the vectors the build for ``dtype`` computes with, in bytes: 16 (SSE2, NEON), 32 (AVX)
    or 64 (AVX-512); NativeUnavailable if it cannot be built."""
    return int(library(dtype).mog_vector_bytes())


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the C engine can be used here (builds it on first call)."""
    try:
        library(dtype)
        return True
    except NativeUnavailable:
        return False


def unavailable_reason(dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    try:
        library(dtype)
        return None
    except NativeUnavailable as e:
        return str(e)


def check_engine(params: Tensor) -> None:
    """ValueError unless ``params`` can run on this engine here (CPU, float32 or float64, the C file built);
    the counterpart of numgan.mog_triton.check_engine, for numgan.mog_fused.FusedMoG(backend="native")."""
    if params.device.type != "cpu":
        raise ValueError(f"backend='native' runs on the CPU, got parameters on {params.device}; "
                         "use backend='triton' or 'torch' on CUDA")
    if params.dtype not in DTYPES:
        raise ValueError(f"backend='native' computes in float32 or float64, got {params.dtype}")
    reason = unavailable_reason(params.dtype)
    if reason is not None:
        raise ValueError(f"backend='native' is unavailable here: {reason}")


def _split(n: int, parts: int) -> list:
    """[(lo, hi), ...]: range(n) in at most ``parts`` nonempty contiguous slices of near-equal size."""
    parts = max(1, min(n, parts))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _check(params: Tensor, x_real: Tensor, z: Tensor, extra=()) -> None:
    for name, t in (("params", params), ("x_real", x_real), ("z", z)) + tuple(extra):
        if t.device.type != "cpu":
            raise ValueError(f"the native MoG engine runs on the CPU; {name} is on {t.device}")
        if t.dtype != params.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, params {params.dtype}; they must match")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if params.dtype not in DTYPES:
        raise ValueError(f"the native MoG engine computes in float32 or float64, got {params.dtype}")
    if params.dim() != 2 or params.shape[1] != N_PARAMS or params.shape[0] < 1:
        raise ValueError(f"params must be [S >= 1, {N_PARAMS}] (numgan.mog_fused.pack), got {tuple(params.shape)}")
    S = params.shape[0]
    if x_real.dim() != 3 or x_real.shape[0] != S or x_real.shape[2] != X_DIM or x_real.shape[1] < 1:
        raise ValueError(f"x_real must be [S={S}, B, {X_DIM}], got {tuple(x_real.shape)}")
    if z.shape != (S, x_real.shape[1], Z_DIM):
        raise ValueError(f"z must be [S={S}, B={x_real.shape[1]}, {Z_DIM}], got {tuple(z.shape)}")
    for name, t in extra:
        if t.shape != params.shape:
            raise ValueError(f"{name} must have the shape of params {tuple(params.shape)}, got {tuple(t.shape)}")


class Workspace:
    """Scratch memory and outputs of the C engine for S seeds at batch size B (reused across steps)."""

    def __init__(self, S: int, B: int, dtype: torch.dtype, threads: Optional[int] = None):
        self.lib = library(dtype)
        self.S, self.B, self.dtype = S, B, dtype
        self.slices = _split(S, threads if threads is not None else torch.get_num_threads())
        nbytes = self.lib.mog_work_bytes(B)
        self.scratch = [torch.empty(nbytes, dtype=torch.uint8) for _ in self.slices]
        self.grad = torch.empty(S, N_PARAMS, dtype=dtype)
        self.losses = torch.empty(S, 2, dtype=dtype)
        self._pool = ThreadPoolExecutor(len(self.slices)) if len(self.slices) > 1 else None

    def fits(self, S: int, B: int, dtype: torch.dtype) -> bool:
        return (self.S, self.B, self.dtype) == (S, B, dtype)

    def run(self, fn) -> None:
        """fn(lo, hi, scratch) for each slice of seeds, in parallel threads when there are several."""
        if self._pool is None:
            fn(*self.slices[0], self.scratch[0])
            return
        for f in [self._pool.submit(fn, a, b, w) for (a, b), w in zip(self.slices, self.scratch)]:
            f.result()


def _ptr(t: Tensor, row: int = 0) -> int:
    return t.data_ptr() + row * t.stride(0) * t.element_size()


def _prepare(params, x_real, z, gamma, workspace, extra=()):
    """Checked input -> (workspace, B, gamma as the C code takes it: -1 for SimGA). Without a fitting
    ``workspace``, a single-threaded one is made for this call."""
    _check(params, x_real, z, extra)
    if gamma is not None and gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    S, B = x_real.shape[0], x_real.shape[1]
    ws = workspace if workspace is not None and workspace.fits(S, B, params.dtype) else Workspace(S, B, params.dtype, 1)
    return ws, B, -1.0 if gamma is None else float(gamma)


def direction(params: Tensor, x_real: Tensor, z: Tensor, gamma: Optional[float],
              workspace: Optional[Workspace] = None) -> tuple[Tensor, Tensor]:
    """(direction [S, 2003], losses [S, 2] = (L_D, L_G)) of one minibatch, objective ``standard``.

    The direction is u = (grad_theta L_G, grad_phi L_D) for ``gamma=None`` (SimGA) and u + gamma J_u^T u
    for ConOpt, as numgan.mog_fused.conopt_direction. Both outputs live in the workspace (overwritten by
    the next call with it); without one, a single-threaded workspace is made for this call.
    """
    ws, B, g = _prepare(params, x_real, z, gamma, workspace)

    def part(a, b, scratch):
        ws.lib.mog_direction(b - a, B, _ptr(params, a), _ptr(x_real, a), _ptr(z, a), g, _ptr(ws.grad, a),
                             _ptr(ws.losses, a), scratch.data_ptr())

    ws.run(part)
    return ws.grad, ws.losses


def step(params: Tensor, square_avg: Tensor, x_real: Tensor, z: Tensor, gamma: Optional[float], lr: float,
         decay: float, eps: float, workspace: Optional[Workspace] = None, losses: bool = True) -> Optional[Tensor]:
    """One SimGA (``gamma=None``) or ConOpt game step with TF-1 RMSProp (spec 1.3), in place on ``params``
    and ``square_avg`` [S, 2003]: g = :func:`direction`; ms <- decay ms + (1 - decay) g^2;
    params <- params - lr g / sqrt(ms + eps). Returns the minibatch losses [S, 2] (a workspace buffer), or
    None with ``losses=False``, which skips computing them."""
    ws, B, g = _prepare(params, x_real, z, gamma, workspace, extra=(("square_avg", square_avg),))

    def part(a, b, scratch):
        # 1 - decay computed in double, as torch's addcmul_(value=1 - decay) does (in float: 0.100000024)
        ws.lib.mog_step(b - a, B, _ptr(params, a), _ptr(square_avg, a), _ptr(x_real, a), _ptr(z, a), g, lr,
                        decay, 1.0 - decay, eps, _ptr(ws.grad, a), _ptr(ws.losses, a) if losses else None,
                        scratch.data_ptr())

    ws.run(part)
    return ws.losses if losses else None


def jacobian(x: Tensor, x_real: Tensor, z: Tensor, threads: Optional[int] = None) -> Tensor:
    """Exact game Jacobian v'(x) [2003, 2003] of one run on a fixed minibatch (objective ``standard``): the
    same matrix as numgan.mog_fused.jacobian (row i of -v' is H_{L_G} e_i for a generator index i, H_{L_D} e_i
    for a discriminator index), one tangent pass per row, the terms of the other player's zero tangent
    skipped. ``x`` [2003], ``x_real`` [B, 2], ``z`` [B, 16] on the CPU, float32 or float64 (use float64 for
    eigenvalues). Rows are split over ``threads`` (default ``torch.get_num_threads()``)."""
    if x.dim() != 1 or x.numel() != N_PARAMS:
        raise ValueError(f"x must be a flat [{N_PARAMS}] parameter vector, got {tuple(x.shape)}")
    if x_real.dim() != 2 or z.dim() != 2:
        raise ValueError(f"x_real [B, 2] and z [B, 16] (one run's batch), got {tuple(x_real.shape)}, "
                         f"{tuple(z.shape)}")
    x = x.detach().contiguous()
    x_real, z = x_real.to(x.dtype).contiguous(), z.to(x.dtype).contiguous()
    _check(x[None], x_real[None], z[None])
    B = x_real.shape[0]
    lib = library(x.dtype)
    out = torch.empty(N_PARAMS, N_PARAMS, dtype=x.dtype)
    rows = _split(N_PARAMS, threads if threads is not None else torch.get_num_threads())

    def part(ab):
        scratch = torch.empty(lib.mog_work_bytes(B), dtype=torch.uint8)
        lib.mog_jacobian(B, x.data_ptr(), x_real.data_ptr(), z.data_ptr(), ab[0], ab[1], _ptr(out, ab[0]),
                         scratch.data_ptr())

    with ThreadPoolExecutor(len(rows)) as pool:
        list(pool.map(part, rows))
    return out
