"""numgan.mog_native built the ways other machines build it: every vector width, clang, and ARM (NEON).

tests/test_mog_native.py checks the build this machine makes by default (gcc here, AVX2: 32-byte vectors).
The same C file runs on machines the project does not have: AVX-512 (64-byte vectors), SSE2-only x86 and
ARM with NEON (16-byte vectors), and with clang (macOS, the BSDs). Here:

* every vector width, forced with ``NUMGAN_NATIVE_CFLAGS=-DVBYTES=16|32|64`` (a width the CPU lacks is
  split by the compiler into the CPU's vectors: slow, the same arithmetic), and a plain SSE2 build without FMA
  (``-march=x86-64``), with the default compiler and with clang; an AVX-512 build is compiled only;
* aarch64 builds by gcc's and clang's cross compilers, run under qemu (user mode): the NEON code the
  compilers emit and aarch64's C library, through ``tests/native_driver.c`` (Python and torch do not run
  there).

Each must give the numbers numgan.mog_fused gives in float64 (SimGA and ConOpt directions, losses, a TF-1
RMSProp step, the Jacobian), and float32 up to rounding. clang, the cross compilers and qemu are optional: a
missing tool skips its tests and names the Debian package to install (.ci/run installs them when it can).
"""
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from numgan import mog_fused as mf, mog_native as mn

from test_mog_native import _random_case

F64 = torch.float64
S, B, GAMMA = 2, 67, 10.0              # 67 rows: every remainder of the 4-row blocks and 64-row chunks
LR, DECAY, EPS = 1e-3, 0.9, 1e-10
ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "native_driver.c"

if not mn.available():
    pytest.skip(f"numgan.mog_native unavailable: {mn.unavailable_reason()}", allow_module_level=True)


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not found (Debian: apt install {package})")
    return path


@pytest.fixture(scope="module")
def case():
    """One fresh random case and mog_fused's float64 answers for it."""
    x, xr, z = _random_case(S, B, seed=31)
    ld, lg, u = mf.player_grads(x, xr, z)
    w = mf.conopt_direction(x, xr, z, GAMMA)
    ms = torch.ones_like(x)                     # TF-1 RMSProp's first step from its initial accumulator
    ms_next = DECAY * ms + (1 - DECAY) * w * w
    step = (x - LR * w / torch.sqrt(ms_next + EPS), ms_next)
    jac = mf.jacobian(x[0], xr[0], z[0], chunk_size=500)
    return dict(x=x, xr=xr, z=z, u=u, w=w, losses=torch.stack([ld, lg], 1), step=step, jac=jac)


def _assert_matches(case, u, w, losses, params, ms, jac):
    """A build's float64 answers against mog_fused's."""
    torch.testing.assert_close(u, case["u"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w, case["w"], rtol=1e-11, atol=1e-13)
    # torch's softplus returns x for x > 20 (tests/test_mog_native.py): losses to 1e-8
    torch.testing.assert_close(losses, case["losses"], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(params, case["step"][0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ms, case["step"][1], rtol=1e-11, atol=1e-14)
    ref = case["jac"]
    torch.testing.assert_close(jac, ref, rtol=1e-11, atol=1e-12 * ref.abs().max().item())


def _assert_float32_close(got, ref):
    """A float32 build's [S, 2003] answer against the float64 one: every layer block of every seed to 2e-5
    relative (measured: <= 2e-6), and every entry to 1e-3 of its size plus 1e-6 of the largest (measured:
    3e-5), so that neither a wrong layer nor a few wrong entries can hide in a norm."""
    got = got.double()
    blocks = [b for views in (mf.layer_views(got), mf.layer_views(ref)) for b in views[0] + views[1]]
    n = len(blocks) // 2
    for s in range(ref.shape[0]):
        for a, b in zip(blocks[:n], blocks[n:]):
            assert (a[s] - b[s]).norm() <= 2e-5 * b[s].norm(), (s, a.shape)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-6 * ref.abs().max().item())


# -- every vector width, default compiler and clang (loaded into this process) ------------------------------

X86 = platform.machine() in ("x86_64", "AMD64")
# build flags -> the vector width they give. "-DVBYTES=n" forces a width whatever the CPU has (a width wider than
# the CPU's is split by the compiler into its native vectors: here the 64-byte width runs as AVX2 pairs, not as
# AVX-512 code); "-march=x86-64" is a plain SSE2 build without FMA (the C file picks 16 bytes itself)
WIDTHS = {"-DVBYTES=16": 16, "-DVBYTES=32": 32, "-DVBYTES=64": 64}
if X86:
    WIDTHS["-march=x86-64"] = 16


@pytest.mark.parametrize("flags", list(WIDTHS))
@pytest.mark.parametrize("cc", ["default", "clang"])
def test_every_vector_width_and_compiler_computes_the_same(case, flags, cc, tmp_path, monkeypatch):
    width = WIDTHS[flags]
    if cc == "clang":
        monkeypatch.setenv("CC", _need("clang", "clang"))
    monkeypatch.setenv("NUMGAN_NATIVE_CFLAGS", flags)
    monkeypatch.setenv("NUMGAN_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(mn, "_libs", {})      # build afresh for this test; restored afterwards
    monkeypatch.setattr(mn, "_failures", {})
    assert mn.vector_bytes(F64) == width and mn.vector_bytes(torch.float32) == width
    x, xr, z = case["x"], case["xr"], case["z"]
    u, _ = mn.direction(x, xr, z, None)
    u = u.clone()
    w, losses = mn.direction(x, xr, z, GAMMA)
    w, losses = w.clone(), losses.clone()
    params, ms = x.clone(), torch.ones_like(x)
    mn.step(params, ms, xr, z, GAMMA, LR, DECAY, EPS)
    jac = mn.jacobian(x[0], xr[0], z[0], threads=2)
    _assert_matches(case, u, w, losses, params, ms, jac)
    x32, xr32, z32 = x.float(), xr.float(), z.float()
    _assert_float32_close(mn.direction(x32, xr32, z32, None)[0], case["u"])
    _assert_float32_close(mn.direction(x32, xr32, z32, GAMMA)[0], case["w"])
    params32 = x32.clone()
    mn.step(params32, torch.ones_like(x32), xr32, z32, GAMMA, LR, DECAY, EPS)
    # parameters ~0.5 in float32 (resolution ~3e-8), updates up to lr sqrt(10) = 3e-3
    torch.testing.assert_close(params32.double(), case["step"][0], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not X86, reason="x86-64 only")
def test_an_avx512_build_compiles_to_avx512_code(tmp_path, monkeypatch):
    """No AVX-512 CPU here to run it on; at least the code the compiler emits for one uses 64-byte registers."""
    objdump = _need("objdump", "binutils")
    monkeypatch.setenv("NUMGAN_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("NUMGAN_NATIVE_CFLAGS", "-march=x86-64-v4")
    for dtype in (torch.float32, F64):
        lib = mn._build(dtype)
        asm = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, timeout=120).stdout
        assert "zmm" in asm and "vfmadd" in asm


def test_extra_flags_are_part_of_the_cache_key_and_named_when_they_break_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMGAN_NATIVE_CACHE", str(tmp_path))
    monkeypatch.delenv("NUMGAN_NATIVE_CFLAGS", raising=False)
    plain = mn._build(torch.float32)
    monkeypatch.setenv("NUMGAN_NATIVE_CFLAGS", "-DVBYTES=16")
    assert mn._build(torch.float32) != plain
    monkeypatch.setenv("NUMGAN_NATIVE_CFLAGS", "-DVBYTES=24")      # the C file accepts 16, 32 or 64 only
    with pytest.raises(mn.NativeUnavailable, match="(?s)NUMGAN_NATIVE_CFLAGS=.-DVBYTES=24.*VBYTES must be"):
        mn._build(torch.float32)
    monkeypatch.setenv("NUMGAN_NATIVE_CFLAGS", '-DX="unclosed')     # not even shell syntax
    with pytest.raises(mn.NativeUnavailable, match="NUMGAN_NATIVE_CFLAGS"):
        mn._build(torch.float32)


# -- aarch64 (NEON) under qemu ------------------------------------------------------------------------------

def _arm_driver(compiler: str, real: str, out_dir: Path) -> Path:
    """tests/native_driver.c + numgan/mog_native.c built for aarch64 (static, so qemu needs no sysroot), with
    the flags numgan.mog_native uses (no -march: the cross compilers' default aarch64 target has NEON)."""
    gcc = _need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    libc = subprocess.run([gcc, "-print-file-name=libc.a"], capture_output=True, text=True, timeout=60).stdout.strip()
    if not os.path.isabs(libc) or not os.path.exists(libc):      # the compiler without aarch64's C library
        pytest.skip("aarch64 C library not found (Debian: apt install libc6-dev-arm64-cross)")
    defines = [f"-DREAL={real}"] + (["-DREAL_IS_DOUBLE"] if real == "double" else [])
    flags = ["-O3", "-std=c11", "-ffp-contract=fast", *defines]
    exe = out_dir / f"driver-{compiler}-{real}"
    if compiler == "gcc":
        cmds = [[gcc, *flags, "-Wno-psabi", "-static", "-o", str(exe), str(DRIVER), str(mn.SOURCE), "-lm"]]
    else:   # clang compiles, the cross gcc links (clang has no aarch64 linker setup of its own here)
        clang = [_need("clang", "clang"), "--target=aarch64-linux-gnu"]
        objs = [out_dir / f"{n}-{real}.o" for n in ("driver", "engine")]
        cmds = [[*clang, *flags, "-c", "-o", str(objs[0]), str(DRIVER)],
                [*clang, *flags, "-c", "-o", str(objs[1]), str(mn.SOURCE)],
                [gcc, "-static", "-o", str(exe), *map(str, objs), "-lm"]]
    for cmd in cmds:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    return exe


def _qemu(exe: Path, args, *arrays, n_out: int, dtype) -> np.ndarray:
    qemu = _need("qemu-aarch64", "qemu-user")
    data = b"".join(np.ascontiguousarray(a.numpy()).tobytes() for a in arrays)
    res = subprocess.run([qemu, str(exe), *map(str, args)], input=data, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    out = np.frombuffer(res.stdout, dtype=dtype)
    assert out.size == n_out, (out.size, n_out)
    return out


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_aarch64_neon_build_under_qemu_computes_the_same(case, compiler, tmp_path):
    _need("qemu-aarch64", "qemu-user")
    n = mf.N_PARAMS
    x, xr, z = case["x"], case["xr"], case["z"]
    exe = _arm_driver(compiler, "double", tmp_path)
    width = subprocess.run([shutil.which("qemu-aarch64"), str(exe), "width"], capture_output=True, text=True,
                           timeout=60)
    assert width.stdout.strip() == "16"    # NEON: 128-bit vectors
    f64 = np.float64
    out = _qemu(exe, ["direction", S, B, -1], x, xr, z, n_out=S * n + 2 * S, dtype=f64)
    u = torch.from_numpy(out[:S * n].copy()).view(S, n)
    out = _qemu(exe, ["direction", S, B, GAMMA], x, xr, z, n_out=S * n + 2 * S, dtype=f64)
    w, losses = torch.from_numpy(out[:S * n].copy()).view(S, n), torch.from_numpy(out[S * n:].copy()).view(S, 2)
    out = _qemu(exe, ["step", S, B, GAMMA, LR, DECAY, EPS], x, torch.ones_like(x), xr, z,
                n_out=2 * S * n + 2 * S, dtype=f64)
    params, ms = (torch.from_numpy(out[i * S * n:(i + 1) * S * n].copy()).view(S, n) for i in (0, 1))
    out = _qemu(exe, ["jacobian", B, 0, n], x[0], xr[0], z[0], n_out=n * n, dtype=f64)
    jac = torch.from_numpy(out.copy()).view(n, n)
    _assert_matches(case, u, w, losses, params, ms, jac)

    exe32 = _arm_driver(compiler, "float", tmp_path)
    for gamma, ref in ((-1, case["u"]), (GAMMA, case["w"])):
        out = _qemu(exe32, ["direction", S, B, gamma], x.float(), xr.float(), z.float(), n_out=S * n + 2 * S,
                    dtype=np.float32)
        _assert_float32_close(torch.from_numpy(out[:S * n].copy()).view(S, n), ref)


def test_the_driver_rejects_bad_arguments_and_short_input(tmp_path):
    """The driver is native too (no qemu needed): it says what is wrong instead of reading garbage."""
    cc = mn.compiler()
    exe = tmp_path / "driver"
    res = subprocess.run([*cc, "-O1", "-std=c11", "-o", str(exe), str(DRIVER), str(mn.SOURCE), "-lm"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert subprocess.run([str(exe)], capture_output=True, timeout=60).returncode == 1
    short = subprocess.run([str(exe), "direction", "1", "4", "1"], input=b"\0" * 64, capture_output=True, timeout=60)
    assert short.returncode == 2 and b"short input" in short.stderr
    for args in (["direction", "x", "4", "1"], ["direction", "1", "-3", "1"], ["jacobian", "4", "10", "5"]):
        bad = subprocess.run([str(exe), *args], input=b"", capture_output=True, timeout=60)
        assert bad.returncode == 1 and b"bad integer" in bad.stderr, args
    x, xr, z = _random_case(1, 4, dtype=torch.float32, seed=2)
    extra = subprocess.run([str(exe), "direction", "1", "4", "-1"], capture_output=True, timeout=60,
                           input=b"".join(t.numpy().tobytes() for t in (x, xr, z, z)))
    assert extra.returncode == 2 and b"more input" in extra.stderr
    ok = subprocess.run([str(exe), "direction", "1", "4", "-1"], capture_output=True, timeout=60,
                        input=b"".join(t.numpy().tobytes() for t in (x, xr, z)))
    assert ok.returncode == 0
    u = torch.from_numpy(np.frombuffer(ok.stdout, dtype=np.float32)[:mf.N_PARAMS].copy())
    torch.testing.assert_close(u, mn.direction(x, xr, z, None)[0][0], rtol=1e-5, atol=1e-6)
