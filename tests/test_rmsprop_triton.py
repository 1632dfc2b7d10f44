"""TF1RMSprop's one-kernel update (``fused``) against its multi-tensor path, in Triton's CPU interpreter.

As in test_mog_triton.py, the interpreter must be switched on (TRITON_INTERPRET=1) before the kernel is
decorated, i.e. before numgan is imported, so the checks run this file as a script in a subprocess. The
interpreter computes in numpy float32 with IEEE square root and division, as the kernel does on CUDA; the
multi-tensor path rounds the same operations in a slightly different order, so the two agree to float32
rounding, not bitwise. The CUDA test compares them on the GPU when there is one.
"""
import os
import subprocess
import sys

import pytest
import torch

from numgan import rmsprop
from numgan.optim import ConOpt, Smoothing
from numgan.rmsprop import TF1RMSprop

needs_triton = pytest.mark.skipif(not rmsprop.fused_available(), reason="Triton is not installed")
CLOSE = dict(rtol=2e-6, atol=2e-8)   # a few float32 ulps of the parameters and of an update (lr 0.05)


def _params(device="cpu", seed=0):
    """Tensors of every layout the models produce: contiguous, channels-last, transposed, a [1, n] weight whose
    size-1 dimension has an arbitrary stride, a 0-d scalar, one spanning several kernel programs, an empty one;
    and a non-dense one, which the fused optimiser leaves to torch's kernels; then vectors, 20 tensors in all."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ts = [r(8, 3, 5, 5).contiguous(memory_format=torch.channels_last), r(7, 5).t(), r(3000),
          r(2048, 1).t(), r(()), r(16, 3, 3, 3), torch.empty(0, 4), r(8, 6)[:, ::2]]
    ts += [r(1 + 97 * i) for i in range(12)]   # 20 tensors: launches of 8, 8 and fewer
    return [torch.nn.Parameter(t.to(device)) for t in ts]


def _grads(params, seed, layout_of=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        t = torch.randn(p.shape, generator=g).to(p.device)
        if layout_of == "contiguous":
            t = t.contiguous()
        elif p.dim() == 4:
            t = torch.empty_like(p).copy_(t)
        out.append(t)
    return out


def _run(fused, steps=4, extra=True, layout_of=None, device="cpu"):
    params = _params(device)
    opt = TF1RMSprop(params, lr=0.05, fused=fused)
    for k in range(steps):
        grads = _grads(params, 10 + k, layout_of)
        ext = _grads(params, 100 + k, layout_of) if extra else None
        if ext is not None:
            ext[1] = None   # a tensor without the second term (smoothing's generator)
        if k == 0 and not extra:
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
        else:
            opt.apply_gradients(params, grads, ext, alpha=0.7)
    return params, opt


def _same(a, b):
    for (pa, pb) in zip(a[0], b[0]):
        torch.testing.assert_close(pa, pb, **CLOSE)
        if pa.numel():
            sa, sb = a[1].state[pa], b[1].state[pb]
            assert sa["step"] == sb["step"] == 4
            torch.testing.assert_close(sa["square_avg"], sb["square_avg"], **CLOSE)
            assert rmsprop.same_layout(sa["square_avg"], pa) or not rmsprop._dense(pa)


def _interpreter_checks():
    from numgan import _triton
    assert _triton.INTERPRET
    for kw in (dict(extra=True), dict(extra=False), dict(extra=True, layout_of="contiguous")):
        fused, plain = _run(None, **kw), _run(False, **kw)
        assert fused[1]._fuses(fused[1].param_groups[0], fused[0]) == [True] * 7 + [False] + [True] * 12
        assert not any(plain[1]._fuses(plain[1].param_groups[0], plain[0]))
        _same(fused, plain)
        moved = [(p - q).abs().max() for p, q in zip(fused[0], _params()) if p.numel()]
        assert min(moved) > 1e-3          # every tensor was updated
    # the game optimisers hand their directions over as they are (ConOpt's u + gamma J^T u is formed in the kernel)
    for cls, kw in ((ConOpt, dict(gamma=3.0)), (ConOpt, dict(gamma=3.0, unbiased=True)), (Smoothing, dict(gamma=3.0))):
        ends = []
        for fused in (None, False):
            torch.manual_seed(0)
            G, D = torch.nn.Sequential(torch.nn.Linear(3, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)), \
                torch.nn.Sequential(torch.nn.Linear(2, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
            opt = cls(G.parameters(), D.parameters(), optimizer=lambda ps: TF1RMSprop(ps, lr=0.01, fused=fused), **kw)
            gen = torch.Generator().manual_seed(1)

            def closure(need_d=True, need_g=True):
                z, x = torch.randn(32, 3, generator=gen), torch.randn(32, 2, generator=gen)
                d_fake = D(G(z))
                return (torch.nn.functional.softplus(-D(x)).mean() + torch.nn.functional.softplus(d_fake).mean(),
                        torch.nn.functional.softplus(-d_fake).mean())

            for _ in range(3):
                opt.step(closure)
            ends.append(torch.cat([p.detach().reshape(-1) for p in opt.params]))
        torch.testing.assert_close(ends[0], ends[1], **CLOSE)
    # fused=True where it cannot run: a clear error
    with pytest.raises(RuntimeError, match="dense float32"):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        TF1RMSprop([p], fused=True).apply_gradients([p], [torch.ones(3, dtype=torch.float64)])


@needs_triton
def test_fused_update_equals_the_multi_tensor_path_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "interpreter checks passed" in res.stdout


def test_fused_choice_and_errors_without_a_gpu():
    """On the CPU (no interpreter) the multi-tensor path runs; fused=True there, or with momentum, is an error."""
    params, opt = _run(None)
    if not torch.cuda.is_available():
        from numgan import _triton
        assert _triton.INTERPRET or not any(opt._fuses(opt.param_groups[0], params))
    with pytest.raises(ValueError, match="momentum=0"):
        TF1RMSprop(_params(), momentum=0.9, fused=True)
    with pytest.raises(ValueError, match="one gradient"):
        opt.apply_gradients(params, [])
    with pytest.raises(ValueError, match="does not hold"):
        opt.apply_gradients([torch.nn.Parameter(torch.ones(2))], [torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        opt.apply_gradients(params[2:3], [torch.ones(1)])      # would broadcast
    # a gradient of another dtype or layout is converted to the parameter's (laid_out_as)
    p = params[0]
    assert rmsprop.laid_out_as(p.detach().double(), p).dtype == torch.float32
    assert rmsprop.same_layout(rmsprop.laid_out_as(p.detach().contiguous(), p), p)


@pytest.mark.skipif(not torch.cuda.is_available() or not rmsprop.fused_available(), reason="needs CUDA and Triton")
def test_fused_update_equals_the_multi_tensor_path_on_cuda():
    for kw in (dict(extra=True), dict(extra=False), dict(extra=True, layout_of="contiguous")):
        fused, plain = _run(None, device="cuda", **kw), _run(False, device="cuda", **kw)
        assert fused[1]._fuses(fused[1].param_groups[0], fused[0]) == [True] * 7 + [False] + [True] * 12
        _same(fused, plain)


if __name__ == "__main__":
    _interpreter_checks()
    print("interpreter checks passed")
