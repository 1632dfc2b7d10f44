"""numgan.mog_triton's kernels against numgan.mog_fused (itself tested against autograd) in float64.

Triton kernels run on the CPU in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before the kernels are decorated, i.e. before numgan.mog_triton is imported; other test modules import
numgan early, so the kernel checks run this file as a script in a subprocess with the variable set.
In the interpreter every product is exact numpy float64 arithmetic, so these check the algebra and the
indexing (tiles, row masks, split partial sums, the hand-over between the pass-2 kernels); the float32 and
TF32 accuracy on CUDA is measured by benchmarks/bench_mog.py (rel. error column).
"""
import os
import subprocess
import sys

import pytest
import torch

from numgan import mog, mog_fused as mf, mog_triton as mt

needs_triton = pytest.mark.skipif(not mt.available(), reason="Triton is not installed (it ships with Linux CUDA torch)")
F64 = torch.float64


def _case(S, B, seed=0):
    G, D = (m.double() for m in mog.make_models(S, seed))
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():  # away from the init, so that the ReLU masks vary
        for p in list(G.parameters()) + list(D.parameters()):
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=F64))
    g = torch.Generator().manual_seed(seed + 1)
    x_real = mog.sample_real(S, B, generator=g, dtype=F64)
    z = torch.randn(S, B, mog.Z_DIM, generator=g, dtype=F64)
    return mf.pack(G, D), x_real, z


def _interpreter_checks():
    assert mt.interpreted()
    close = dict(rtol=1e-10, atol=1e-12)
    # B = 64: 1/B is exact in the float32 scalar the kernels receive; B = 48 leaves a partial tile
    for S, B, opts in ((2, 64, dict(tile=16, split=1)), (2, 64, dict(tile=32, split=3)), (3, 64, {}),
                       (2, 48, dict(tile=32, split=1)), (2, 50, dict(tile=16, split=2, reload=True))):
        x, xr, z = _case(S, B)
        ld, lg, u = mf.player_grads(x, xr, z)
        ref = mf.conopt_direction(x, xr, z, 10.0)
        tol = close if B == 64 else dict(rtol=1e-6, atol=1e-8)  # 1/B reaches the kernels as a float32
        got_u, losses = mt.direction(x, xr, z, None, **opts)
        torch.testing.assert_close(got_u, u, **tol)
        torch.testing.assert_close(losses[:, 0], ld, **tol)
        torch.testing.assert_close(losses[:, 1], lg, **tol)
        got, _ = mt.direction(x, xr, z, 10.0, **opts)
        torch.testing.assert_close(got, ref, **tol)
        assert (got - u).abs().max() > 1e-3  # the consensus term is really there
    # the engine: three SimGA / ConOpt steps with either backend give the same parameters and RMSProp state
    x, _, _ = _case(2, 64, seed=3)
    batches = [_case(2, 64, seed=10 + i)[1:] for i in range(3)]
    # (split=1 ConOpt: the kernels apply RMSProp themselves, mog_triton.conopt_step)
    for method in ("simga", "conopt"):
        a = mf.FusedMoG(x, method)
        bs = [mf.FusedMoG(x, method, backend="triton", triton_options=dict(tile=16, split=2)),
              mf.FusedMoG(x, method, backend="triton", triton_options=dict(tile=16))]
        assert bs[1]._fused_update() == (method == "conopt") and not bs[0]._fused_update()
        for xr, z in batches:
            la = a.step(xr, z)
            for b in bs:
                lb = b.step(xr, z)
                torch.testing.assert_close(lb[0], la[0], **close)
                torch.testing.assert_close(lb[1], la[1], **close)
        for b in bs:
            torch.testing.assert_close(b.params, a.params, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(b.square_avg, a.square_avg, rtol=1e-10, atol=1e-13)
            assert (b.params - x).abs().max() > 1e-6
    # conopt_step itself: the update of FusedMoG.step's formula, and its input checks
    p, ms = x.clone(), torch.full_like(x, 1.0)
    xr, z = batches[0]
    g, _ = mt.direction(x, xr, z, 10.0)
    ms_ref = 0.9 * ms + 0.1 * g * g
    mt.conopt_step(p, ms, xr, z, 10.0, 1e-3, 0.9, 1e-10)
    torch.testing.assert_close(ms, ms_ref, **close)
    torch.testing.assert_close(p, x - 1e-3 * g / torch.sqrt(ms_ref + 1e-10), **close)
    try:
        mt.conopt_step(p, ms[:1], xr, z, 10.0, 1e-3, 0.9, 1e-10)
        raise AssertionError("a square_avg of the wrong shape was accepted")
    except ValueError as e:
        assert "square_avg" in str(e)
    print("interpreter checks passed")


@needs_triton
@pytest.mark.slow
def test_kernels_equal_fused_engine_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "interpreter checks passed" in res.stdout


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="backend"):
        mf.FusedMoG(torch.zeros(2, mf.N_PARAMS), "conopt", backend="cuda")
    for engine in ("triton", "triton-tf32"):
        with pytest.raises(ValueError, match="CUDA"):
            mog.train("conopt", n_iters=2, engine=engine, device="cpu")
    with pytest.raises(ValueError, match="triton MoG engine supports"):
        mog.resolve_engine("triton", "altga")
    from numgan import mog_native
    cpu_engine = "native" if mog_native.available() else "fused"
    assert mog.resolve_engine("auto", "conopt") == cpu_engine
    assert mog.resolve_engine("auto", "conopt", device="cpu") == cpu_engine
    assert mog.resolve_engine("auto", "conopt", device="cuda") == ("triton" if mt.available() else "fused")
    assert mog.resolve_engine("auto", "altga", device="cuda") == "autograd"
    x, xr, z = _case(2, 64)
    if not mt.available():
        with pytest.raises(RuntimeError, match="Triton"):
            mt.direction(x, xr, z, 10.0)
        return
    if not mt.interpreted():
        with pytest.raises(ValueError, match="CUDA"):
            mt.direction(x, xr, z, 10.0)
        with pytest.raises(ValueError, match="CUDA"):
            mf.FusedMoG(x.float(), "conopt", backend="triton")
    with pytest.raises(ValueError, match="precision"):
        mt.direction(x, xr, z, 10.0, precision="fp8")
    with pytest.raises(ValueError, match="one row"):
        mt.direction(x, xr[:, :0].contiguous(), z[:, :0].contiguous(), 10.0)
    with pytest.raises(ValueError, match="tile"):
        mt.direction(x, xr, z, 10.0, tile=24)
    with pytest.raises(ValueError, match="x_real"):
        mt.direction(x, xr[:, :, :1].contiguous(), z, 10.0)


def test_triton_runs_are_cached_apart(tmp_path, monkeypatch):
    """engine='triton-tf32' must not reuse a float32 run's cache entry, nor the other way round; the float32
    engines share one."""
    from numgan import runs
    seen = []
    monkeypatch.setattr(runs, "cached", lambda group, name, cfg, fn, force=False: seen.append(dict(cfg)) or {})
    monkeypatch.setattr(mog, "resolve_engine", lambda engine, method, objective="standard", device=None: engine)
    for engine in ("fused", "triton", "native", "triton-tf32"):
        mog.run("conopt", n_iters=10, engine=engine)
    assert runs.config_key(seen[0]) == runs.config_key(seen[1]) == runs.config_key(seen[2])
    assert seen[3]["precision"] == "tf32" and runs.config_key(seen[0]) != runs.config_key(seen[3])


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() and mt.available()), reason="needs a CUDA device and Triton")
def test_kernels_match_float64_on_cuda():
    """The compiled float32 kernels on a GPU (the interpreter checks only the algebra): the ConOpt direction and
    conopt_step's in-place update against numgan.mog_fused in float64 on the same (float32-rounded) inputs, in
    every kernel configuration that is timed."""
    x, xr, z = (t.float().cuda() for t in _case(8, 512))
    x64, xr64, z64 = x.double(), xr.double(), z.double()
    ref = mf.conopt_direction(x64, xr64, z64, 10.0)
    ld, lg, _ = mf.player_grads(x64, xr64, z64)
    for opts in (dict(tile=16, num_warps=4), dict(tile=16, num_warps=8), dict(tile=32, num_warps=8),
                 dict(tile=16, split=4)):
        d, losses = mt.direction(x, xr, z, 10.0, **opts)
        err = float((d.double() - ref).norm() / ref.norm())
        assert err < 1e-4, (opts, err)   # mog_fused in float32 on the CPU: 2.6e-7 on this case
        torch.testing.assert_close(losses.double(), torch.stack([ld, lg], 1), rtol=1e-4, atol=1e-5)
    d, _ = mt.direction(x, xr, z, 10.0, precision="tf32", tile=32, split=16)
    assert float((d.double() - ref).norm() / ref.norm()) < 0.1   # TF32 products: ~1e-2 measured; a wrong term gives O(1)
    ms_ref = 0.9 + 0.1 * ref * ref
    step_ref = -1e-3 * ref / torch.sqrt(ms_ref + 1e-10)   # |step| <= 1e-3 / sqrt(0.1)
    for opts in (dict(tile=16, num_warps=4), dict(tile=16, num_warps=8)):
        p, ms = x.clone(), torch.ones_like(x)
        mt.conopt_step(p, ms, xr, z, 10.0, 1e-3, 0.9, 1e-10, **opts)
        torch.testing.assert_close(ms.double(), ms_ref, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(p.double() - x64, step_ref, rtol=1e-2, atol=1e-7)


if __name__ == "__main__":
    _interpreter_checks()

