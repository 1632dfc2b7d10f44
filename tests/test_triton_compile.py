"""Every Triton kernel of numgan compiles for an H100 (sm_90), checked without a GPU.

The other Triton tests run the kernels in Triton's CPU interpreter, which checks their arithmetic but not
that the compiler accepts them: the interpreter is plain numpy and takes code (layouts, loop-carried types,
shapes) that the GPU compiler rejects. Triton bundles ptxas, so the compilation itself runs here, in the
configurations the launchers use (numgan.conv's dcgan and ResNet layers, numgan.rmsprop, numgan.mog_triton's
float32 and TF32 settings). A kernel that fails here would fail on the first GPU call.
"""
import pytest

from numgan import _triton, conv, mog_triton, rmsprop

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed (it ships with Linux CUDA torch)"),
              pytest.mark.skipif(_triton.INTERPRET, reason="TRITON_INTERPRET=1 replaces the kernels by the interpreter")]

P32, I32, F32 = "*fp32", "i32", "fp32"


def _compiles(fn, types, constexprs, num_warps=4):
    try:
        k = _triton.compile_offline(fn, types, constexprs, num_warps=num_warps)
    except NotImplementedError as e:   # another Triton version's ahead-of-time API
        pytest.skip(str(e))
    assert len(k.asm["cubin"]) > 1000, f"{fn.__name__}: no machine code"
    assert ".entry" in k.asm["ptx"]


MOG_TYPES = {
    "_grad_kernel": dict(P=P32, XR=P32, Z=P32, OUT=P32, LOSS=P32, S=I32, B=I32, rows_per_prog=I32, inv_b=F32),
    "_hvp_real_kernel": dict(P=P32, U=P32, XR=P32, OUT=P32, S=I32, B=I32, rows_per_prog=I32, inv_b=F32),
    "_hvp_fake_kernel": dict(P=P32, U=P32, Z=P32, OUT=P32, DXT=P32, GL=P32, S=I32, B=I32, rows_per_prog=I32,
                             inv_b=F32, gam=F32, X=P32, MS=P32, lr=F32, decay=F32, omd=F32, eps=F32),
    "_hvp_g_kernel": dict(P=P32, U=P32, Z=P32, OUT=P32, DXT=P32, GL=P32, S=I32, B=I32, rows_per_prog=I32, gam=F32,
                          X=P32, MS=P32, lr=F32, decay=F32, omd=F32, eps=F32),
}
# the constexprs mog_triton._launch passes: conopt_step (FINAL and OPT), direction at split 1 (FINAL) and at
# split > 1 (neither); RELOAD as the option says
MOG_CASES = [("_grad_kernel", dict(RELOAD=False)), ("_grad_kernel", dict(RELOAD=True)),
             ("_hvp_real_kernel", dict(RELOAD=False)), ("_hvp_real_kernel", dict(RELOAD=True)),
             ("_hvp_fake_kernel", dict(FINAL=True, OPT=True)), ("_hvp_fake_kernel", dict(FINAL=True, OPT=False)),
             ("_hvp_fake_kernel", dict(FINAL=False, OPT=False)),
             ("_hvp_g_kernel", dict(FINAL=True, RELOAD=False, OPT=True)),
             ("_hvp_g_kernel", dict(FINAL=False, RELOAD=True, OPT=False))]


@pytest.mark.parametrize("kernel,consts", MOG_CASES, ids=[f"{k}-{'-'.join(f'{n}{int(v)}' for n, v in c.items())}"
                                                         for k, c in MOG_CASES])
@pytest.mark.parametrize("precision,tile,num_warps", [("ieee", 16, 4), ("ieee", 16, 8), ("tf32", 32, 4)])
def test_mog_kernels_compile(kernel, consts, precision, tile, num_warps):
    _compiles(getattr(mog_triton, kernel), MOG_TYPES[kernel], dict(consts, T=tile, PREC=precision), num_warps)


# numgan.conv: 5x5 stride-2 layers (dcgan: 75/76-column and 1600-column matrices) and 3x3 stride-1 (ResNet)
_IM2COL_INTS = "n_rows n_cols n_valid C H W Ho Wo top left x_b x_c x_h x_w m_b m_c m_h m_w".split()
_COL2IM_INTS = ("n_pos C H W Ho Wo top left s_b s_i s_j s_p s_q s_c t_b t_i t_j t_p t_q t_c o_b o_c o_h o_w "
                "m_b m_c m_h m_w").split()


@pytest.mark.parametrize("k,s,cpq,mask,mask_self,br,bj", [
    (5, 2, False, False, False, 64, 32), (5, 2, True, True, True, 16, 128), (5, 2, False, True, False, 16, 128),
    (3, 1, False, True, True, 16, 128)])
def test_im2col_compiles(k, s, cpq, mask, mask_self, br, bj):
    types = dict(x=P32, cols=P32, mask_src=P32, slope=P32, **{n: I32 for n in _IM2COL_INTS})
    _compiles(conv._im2col_kernel, types, dict(K=k, S=s, CPQ=cpq, MASK=mask, MASK_SELF=mask_self,
                                               BLOCK_R=br, BLOCK_J=bj))


@pytest.mark.parametrize("k,s,bias,two,mask,act,bp,bc", [
    (5, 2, True, False, False, False, 32, 64), (5, 2, False, False, True, False, 32, 64),
    (5, 2, True, False, False, True, 128, 16), (3, 1, True, False, True, False, 32, 64),
    (5, 2, True, True, True, False, 32, 64), (5, 2, False, True, False, False, 128, 16)])   # TWO: Im2ColPair's
def test_col2im_compiles(k, s, bias, two, mask, act, bp, bc):
    types = dict(cols=P32, cols2=P32, bias=P32, out=P32, mask_src=P32, slope=P32, **{n: I32 for n in _COL2IM_INTS})
    _compiles(conv._col2im_kernel, types, dict(K=k, S=s, KT=-(-k // s), HAS_BIAS=bias, TWO=two, MASK=mask, ACT=act,
                                               ACC=_triton.tl.float32, BLOCK_P=bp, BLOCK_C=bc))


@pytest.mark.parametrize("has_e", [False, True])
def test_rmsprop_kernel_compiles(has_e):
    types = {f"{x}{i}": P32 for i in range(rmsprop._SLOTS) for x in "pgem"}
    types.update({f"n{i}": I32 for i in range(rmsprop._SLOTS)})
    types.update({f"s{i}": I32 for i in range(1, rmsprop._SLOTS)})
    types.update(lr=F32, decay=F32, one_minus_decay=F32, eps=F32, alpha=F32)
    _compiles(rmsprop._tf1_rmsprop_kernel, types, dict(HAS_E=has_e, BLOCK=rmsprop._BLOCK))


def test_compile_offline_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no type or value"):
        _triton.compile_offline(rmsprop._tf1_rmsprop_kernel, {}, {})
    types, consts = MOG_TYPES["_hvp_real_kernel"], dict(RELOAD=False, T=16, PREC="ieee")
    with pytest.raises(ValueError, match="aligned"):
        _triton.compile_offline(mog_triton._hvp_real_kernel, types, consts, aligned=["Q"])
    with pytest.raises(ValueError, match="not its arguments"):
        _triton.compile_offline(mog_triton._hvp_real_kernel, dict(types, Q=I32), consts)
    with pytest.raises(ValueError, match="both a type and a constant"):
        _triton.compile_offline(mog_triton._hvp_real_kernel, types, dict(consts, S=256))
