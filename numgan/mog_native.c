/* The MoG ConOpt / SimGA step in portable C, for the CPU (numgan.mog_native; paper Sec. 5, Alg. 1-2,
 * Eq. 16-17; spec 1.3-1.5; issue 4).
 *
 * The same algebra as numgan.mog_fused (read its docstrings first): u = (grad_theta L_G, grad_phi L_D)
 * by a hand-written backward pass, J_u^T u = H_{L_G}(u_theta, 0) + H_{L_D}(0, u_phi) by a hand-written
 * forward-over-reverse pass, then the TF-1 RMSProp update. What differs is only how it is computed:
 *
 *  - Every row of every layer is 16 lanes (the hidden width of both networks), handled as native-width
 *    vectors of GCC/Clang's vector extensions: the compiler emits AVX2, AVX-512 or NEON as the machine has.
 *  - Products are register-blocked by hand (4 rows or 4 input units per sweep) and fused with their
 *    bias, ReLU, ReLU mask and second operand, so a layer is one pass over its rows.
 *  - The narrow layers (G's 16 -> 2 output, D's 2 -> 16 input, D's 16 -> 1 logit) cost what they
 *    compute: dot products or 2-term sums, never 16 x 16 products padded with zeros.
 *  - The discriminator runs its primal pass on [real; fake] once; the two fake copies of
 *    numgan.mog_fused (one for L_D, one for L_G) differ only in their deltas and tangents. In the
 *    tangent backward pass their tangent deltas travel summed (the backward pass is linear in them and
 *    both copies share masks and weights), which is the "fake rows, both copies summed" of mog_fused.
 *  - The tangent pass runs in chunks of CH rows, so its temporaries stay in the L1/L2 cache.
 *
 * Compiled twice by numgan.mog_native: REAL=float (the engine) and REAL=double (the tests check the
 * algebra against numgan.mog_fused in float64). No global state; every buffer comes from the caller.
 *
 * Flat layout (numgan.mog_fused): per seed 2003 numbers, G's layers then D's, each layer a row-major
 * [in + 1, out] block P = [W; b].
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <tgmath.h> /* sqrt, exp, log1p, fabs in the precision of REAL */

#ifndef REAL
#define REAL float
#endif
typedef REAL real;
#define L 16 /* lanes of a row: the hidden width */

/* the machine's native vector: rows are handled as L / VW of them (vectors wider than the hardware's
 * make GCC spill every operation to the stack). -DVBYTES=16|32|64 overrides the choice: the tests build
 * all three widths on one machine (a width the hardware lacks is emulated by the compiler, slowly). */
#ifndef VBYTES
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16 /* SSE2, NEON */
#endif
#endif
#if VBYTES != 16 && VBYTES != 32 && VBYTES != 64
#error "VBYTES must be 16, 32 or 64"
#endif
#define VW ((int)(VBYTES / sizeof(real)))
#define NV (L / VW)
typedef real vn __attribute__((vector_size(VBYTES), may_alias));
#if defined(REAL_IS_DOUBLE)
typedef int64_t ivn __attribute__((vector_size(VBYTES)));
#else
typedef int32_t ivn __attribute__((vector_size(VBYTES)));
#endif
#define V(p) (*(vn *)(p))           /* the native vector at p (aligned) */
#define VC(p) (*(const vn *)(p))

#define ZD 16       /* latent size */
#define XD 2        /* data size */
#define NL 5        /* layers per network */
#define NP 2003     /* parameters per seed */
#define NG 1122     /* of them the generator's */
#define CH 64       /* rows per chunk of the tangent pass */

static const int GK[NL] = {ZD, L, L, L, L}, GN[NL] = {L, L, L, L, XD};
static const int DK[NL] = {XD, L, L, L, L}, DN[NL] = {L, L, L, L, 1};

/* ---------------------------------------------------------------------------------------------------- */
/* vector helpers                                                                                       */
/* ---------------------------------------------------------------------------------------------------- */

static inline vn vzero(void) { vn z = {0}; return z; }

/* keep x where m > 0, else 0 (the ReLU mask; m is the layer's activation relu(h), > 0 iff h > 0) */
static inline vn vmask(vn x, vn m) { return (vn)((ivn)x & (ivn)(m > vzero())); }

/* relu: x < 0 -> 0; NaN stays NaN (a diverging run must show up in its losses). The masks of the backward
 * passes are bitwise (a NaN delta where the mask is 0 becomes 0, where torch's multiply keeps NaN): only
 * after divergence, whose NaN logits and losses are the same. */
static inline vn vrelu(vn x) { return (vn)((ivn)x & ~(ivn)(x < vzero())); }

static inline real hsum(vn x) {
    real s = 0;
    for (int i = 0; i < VW; i++) s += x[i];
    return s;
}

/* dst[r] = src[r] masked by m[r], rows of L lanes */
static inline void mask_rows(int R, const real *src, const real *m, real *dst) {
    for (int i = 0; i < R * L; i += VW) V(dst + i) = vmask(VC(src + i), VC(m + i));
}

/* ---------------------------------------------------------------------------------------------------- */
/* row products. Arrays are rows of L lanes (row r at p + r L; lanes beyond a layer's width are 0).     */
/* ---------------------------------------------------------------------------------------------------- */

enum { STORE, RELU, MASK };

/* out[r] = post( sum_{k<K1} A1[r][k] M1[k] + sum_{k<K2} A2[r][k] M2[k] + bias ), post by op:
 * STORE, RELU, or MASK (keep where Mk[r] > 0). A2 / bias may be NULL. 4 rows per sweep. */
static inline void mm(int R, const real *A1, int K1, const real *M1, const real *A2, int K2, const real *M2,
                      const real *bias, int op, const real *Mk, real *out) {
    int r = 0;
    for (; r + 4 <= R; r += 4) {
        const real *a = A1 + r * L, *a2 = A2 ? A2 + r * L : NULL;
        vn c[4][NV];
        for (int h = 0; h < NV; h++) {
            vn b = bias ? VC(bias + h * VW) : vzero();
            c[0][h] = b; c[1][h] = b; c[2][h] = b; c[3][h] = b;
        }
        for (int k = 0; k < K1; k++) {
            real x0 = a[k], x1 = a[L + k], x2 = a[2 * L + k], x3 = a[3 * L + k];
            for (int h = 0; h < NV; h++) {
                vn m = VC(M1 + k * L + h * VW);
                c[0][h] += x0 * m; c[1][h] += x1 * m; c[2][h] += x2 * m; c[3][h] += x3 * m;
            }
        }
        if (A2)
            for (int k = 0; k < K2; k++) {
                real x0 = a2[k], x1 = a2[L + k], x2 = a2[2 * L + k], x3 = a2[3 * L + k];
                for (int h = 0; h < NV; h++) {
                    vn m = VC(M2 + k * L + h * VW);
                    c[0][h] += x0 * m; c[1][h] += x1 * m; c[2][h] += x2 * m; c[3][h] += x3 * m;
                }
            }
        for (int i = 0; i < 4; i++)
            for (int h = 0; h < NV; h++) {
                vn v = c[i][h];
                if (op == RELU) v = vrelu(v);
                if (op == MASK) v = vmask(v, VC(Mk + (r + i) * L + h * VW));
                V(out + (r + i) * L + h * VW) = v;
            }
    }
    for (; r < R; r++) {
        const real *a = A1 + r * L;
        for (int h = 0; h < NV; h++) {
            vn c = bias ? VC(bias + h * VW) : vzero();
            for (int k = 0; k < K1; k++) c += a[k] * VC(M1 + k * L + h * VW);
            if (A2)
                for (int k = 0; k < K2; k++) c += A2[r * L + k] * VC(M2 + k * L + h * VW);
            if (op == RELU) c = vrelu(c);
            if (op == MASK) c = vmask(c, VC(Mk + r * L + h * VW));
            V(out + r * L + h * VW) = c;
        }
    }
}

/* narrow outputs: out[r][n] = A1[r] . T1[n] + A2[r] . T2[n] + bias[n] for n < N (other lanes 0).
 * T1 / T2 hold one output unit per row (the transposed weights). A2 / bias may be NULL. */
static inline void dots(int R, int N, const real *A1, const real *T1, const real *A2, const real *T2,
                        const real *bias, real *out) {
    for (int r = 0; r < R; r++) {
        real o[L] __attribute__((aligned(VBYTES))) = {0};
        for (int n = 0; n < N; n++) {
            vn p = vzero();
            for (int h = 0; h < NV; h++) {
                p += VC(A1 + r * L + h * VW) * VC(T1 + n * L + h * VW);
                if (A2) p += VC(A2 + r * L + h * VW) * VC(T2 + n * L + h * VW);
            }
            o[n] = hsum(p) + (bias ? bias[n] : 0);
        }
        for (int h = 0; h < NV; h++) V(out + r * L + h * VW) = VC(o + h * VW);
    }
}

/* wide outer products: acc[k] += sum_r (A1[r][k] D1[r] + A2[r][k] D2[r] + A3[r][k] D3[r]) for k < K,
 * and the bias row acc[K] += sum_r (D1[r] + D2[r]) (the first nb pairs: activations augmented by a ones
 * column; tangent activations have a zero there). Pairs with a NULL A are skipped. 4 units per sweep. */
static inline void outer(int R, int K, const real *A1, const real *D1, const real *A2, const real *D2,
                         const real *A3, const real *D3, int nb, real *acc) {
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        vn c[4][NV];
        for (int h = 0; h < NV; h++) c[0][h] = c[1][h] = c[2][h] = c[3][h] = vzero();
        for (int r = 0; r < R; r++) {
            const real *a = A1 + r * L + k;
            for (int h = 0; h < NV; h++) {
                vn d = VC(D1 + r * L + h * VW);
                c[0][h] += a[0] * d; c[1][h] += a[1] * d; c[2][h] += a[2] * d; c[3][h] += a[3] * d;
            }
            if (A2) {
                a = A2 + r * L + k;
                for (int h = 0; h < NV; h++) {
                    vn d = VC(D2 + r * L + h * VW);
                    c[0][h] += a[0] * d; c[1][h] += a[1] * d; c[2][h] += a[2] * d; c[3][h] += a[3] * d;
                }
            }
            if (A3) {
                a = A3 + r * L + k;
                for (int h = 0; h < NV; h++) {
                    vn d = VC(D3 + r * L + h * VW);
                    c[0][h] += a[0] * d; c[1][h] += a[1] * d; c[2][h] += a[2] * d; c[3][h] += a[3] * d;
                }
            }
        }
        for (int i = 0; i < 4; i++)
            for (int h = 0; h < NV; h++) V(acc + (k + i) * L + h * VW) += c[i][h];
    }
    for (; k < K; k++)
        for (int h = 0; h < NV; h++) {
            vn c = vzero();
            for (int r = 0; r < R; r++) {
                c += A1[r * L + k] * VC(D1 + r * L + h * VW);
                if (A2) c += A2[r * L + k] * VC(D2 + r * L + h * VW);
                if (A3) c += A3[r * L + k] * VC(D3 + r * L + h * VW);
            }
            V(acc + k * L + h * VW) += c;
        }
    if (nb > 0)
        for (int h = 0; h < NV; h++) {
            vn c = vzero();
            for (int r = 0; r < R; r++) {
                c += VC(D1 + r * L + h * VW);
                if (nb > 1) c += VC(D2 + r * L + h * VW);
            }
            V(acc + K * L + h * VW) += c;
        }
}

/* narrow outer products (N < 16 output units), transposed: accT[n] += sum_r (D1[r][n] A1[r] + D2[r][n] A2[r]);
 * with bias not NULL also bias[n] += sum_r D1[r][n] (A1 augmented by ones). A2 may be NULL. */
static inline void outer_t(int R, int N, const real *A1, const real *D1, const real *A2, const real *D2,
                           real *accT, real *bias) {
    for (int n = 0; n < N; n++) {
        vn c[NV];
        for (int h = 0; h < NV; h++) c[h] = vzero();
        real b = 0;
        for (int r = 0; r < R; r++) {
            real d1 = D1[r * L + n], d2 = A2 ? D2[r * L + n] : 0;
            for (int h = 0; h < NV; h++) {
                c[h] += d1 * VC(A1 + r * L + h * VW);
                if (A2) c[h] += d2 * VC(A2 + r * L + h * VW);
            }
            if (bias) b += d1;
        }
        for (int h = 0; h < NV; h++) V(accT + n * L + h * VW) += c[h];
        if (bias) bias[n] += b;
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* parameters in lane form                                                                              */
/* ---------------------------------------------------------------------------------------------------- */

/* One layer: W [K + 1][L] (row K = bias; lanes >= N are 0) and its transpose T [N][L] (lanes >= K are 0),
 * plus the bias again as scalars b. Gradient accumulators use the same struct: wide layers accumulate
 * in W, narrow ones (N < 16) in T and b. */
typedef struct {
    real W[(L + 1) * L] __attribute__((aligned(64)));
    real T[L * L] __attribute__((aligned(64)));
    real b[L] __attribute__((aligned(64)));
} layer;

typedef struct {
    layer g[NL], d[NL];
} net;

static void load_layer(layer *p, const real *flat, int K, int N) {
    memset(p, 0, sizeof(*p));
    for (int k = 0; k <= K; k++)
        for (int n = 0; n < N; n++) p->W[k * L + n] = flat[k * N + n];
    for (int n = 0; n < N; n++) {
        for (int k = 0; k < K; k++) p->T[n * L + k] = flat[k * N + n];
        p->b[n] = flat[K * N + n];
    }
}

static void load_net(net *p, const real *flat) {
    const real *f = flat;
    for (int l = 0; l < NL; l++) { load_layer(&p->g[l], f, GK[l], GN[l]); f += (GK[l] + 1) * GN[l]; }
    for (int l = 0; l < NL; l++) { load_layer(&p->d[l], f, DK[l], DN[l]); f += (DK[l] + 1) * DN[l]; }
}

/* accumulators -> flat (wide layers from W, narrow from T and b) */
static void store_acc(const layer *a, real *flat, int K, int N) {
    for (int k = 0; k <= K; k++)
        for (int n = 0; n < N; n++)
            flat[k * N + n] = N < L ? (k < K ? a->T[n * L + k] : a->b[n]) : a->W[k * L + n];
}

static void store_net(const net *a, real *flat) {
    real *f = flat;
    for (int l = 0; l < NL; l++) { store_acc(&a->g[l], f, GK[l], GN[l]); f += (GK[l] + 1) * GN[l]; }
    for (int l = 0; l < NL; l++) { store_acc(&a->d[l], f, DK[l], DN[l]); f += (DK[l] + 1) * DN[l]; }
}

/* u's accumulators -> the lane form of a tangent direction (W, T and b all filled) */
static void finish_layer(layer *a, int K, int N) {
    if (N < L) {
        memset(a->W, 0, sizeof(a->W));
        for (int n = 0; n < N; n++) {
            for (int k = 0; k < K; k++) a->W[k * L + n] = a->T[n * L + k];
            a->W[K * L + n] = a->b[n];
        }
    } else {
        memset(a->T, 0, sizeof(a->T));
        for (int n = 0; n < N; n++) {
            for (int k = 0; k < K; k++) a->T[n * L + k] = a->W[k * L + n];
            a->b[n] = a->W[K * L + n];
        }
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* workspace                                                                                            */
/* ---------------------------------------------------------------------------------------------------- */

/* Row arrays. Kept from pass 1 for pass 2 (B rows each), per layer l = 0..4: activations (the inputs
 * of layer l) ag (G), ar / af (D on real / fake rows), and deltas at layer l's pre-activation: dG (L_G
 * in G), dr / df (L_D on real / fake rows), dg (L_G on fake rows); sr / sf = sigma(logit) in lane 0.
 * Per chunk of the tangent pass (CH rows): tangent activations tg (G along u_theta), tr / tf (D real /
 * fake along u_phi), tq (D fake along the fake samples' tangent xt = tq[0]); pre-activation tangents th;
 * tangent deltas er (real rows), es (fake rows, both copies summed), eg (G), double-buffered. */
typedef struct {
    real *ag[NL], *dG[NL], *ar[NL], *af[NL], *dr[NL], *df[NL], *dg[NL], *sr, *sf;
    real *tg[NL], *tr[NL], *tf[NL], *tq[NL], *th[4], *er[2], *es[2], *eg[2];
    net *P, *U, *H;        /* parameters, u (the player gradients) and H = J_u^T u, in lane form */
} work;

static size_t n_rows(int B) { return (size_t)B * (7 * NL + 2) + (size_t)CH * (4 * NL + 4 + 6); }

/* the vector width this build uses, in bytes (numgan.mog_native.vector_bytes) */
int mog_vector_bytes(void) { return VBYTES; }

/* bytes of workspace for batch size B (any alignment: carve aligns) */
size_t mog_work_bytes(int B) { return sizeof(net) * 3 + n_rows(B) * L * sizeof(real) + 64; }

static void carve(work *w, void *base, int B) {
    char *p = (char *)(((uintptr_t)base + 63) & ~(uintptr_t)63);
    w->P = (net *)p; w->U = w->P + 1; w->H = w->P + 2;
    real *q = (real *)(w->P + 3);
#define TAKE(x, n) do { (x) = q; q += (size_t)(n) * L; } while (0)
    for (int l = 0; l < NL; l++) {
        TAKE(w->ag[l], B); TAKE(w->dG[l], B); TAKE(w->ar[l], B); TAKE(w->af[l], B);
        TAKE(w->dr[l], B); TAKE(w->df[l], B); TAKE(w->dg[l], B);
    }
    TAKE(w->sr, B); TAKE(w->sf, B);
    for (int l = 0; l < NL; l++) { TAKE(w->tg[l], CH); TAKE(w->tr[l], CH); TAKE(w->tf[l], CH); TAKE(w->tq[l], CH); }
    for (int i = 0; i < 4; i++) TAKE(w->th[i], CH);
    for (int i = 0; i < 2; i++) { TAKE(w->er[i], CH); TAKE(w->es[i], CH); TAKE(w->eg[i], CH); }
#undef TAKE
}

static inline real sigmoid(real x) { return (real)1 / ((real)1 + exp(-x)); }
static inline real softplus(real x) { return (x > 0 ? x : 0) + log1p(exp(-fabs(x))); }

/* ---------------------------------------------------------------------------------------------------- */
/* pass 1: forward, losses, u                                                                           */
/* ---------------------------------------------------------------------------------------------------- */

static void primal(work *w, int B, const real *x_real, const real *z, real *losses) {
    const net *P = w->P;
    net *U = w->U;
    memset(U, 0, sizeof(*U));
    memset(w->ar[0], 0, (size_t)B * L * sizeof(real));
    for (int r = 0; r < B; r++) {
        memcpy(w->ag[0] + r * L, z + r * ZD, ZD * sizeof(real));
        w->ar[0][r * L] = x_real[r * XD];
        w->ar[0][r * L + 1] = x_real[r * XD + 1];
    }
    /* generator forward; its output (lanes 0, 1) is D's fake input */
    for (int l = 0; l < NL - 1; l++)
        mm(B, w->ag[l], GK[l], P->g[l].W, NULL, 0, NULL, P->g[l].W + GK[l] * L, RELU, NULL, w->ag[l + 1]);
    dots(B, XD, w->ag[NL - 1], P->g[NL - 1].T, NULL, NULL, P->g[NL - 1].b, w->af[0]);
    /* discriminator forward on real and fake rows */
    for (int l = 0; l < NL - 1; l++) {
        mm(B, w->ar[l], DK[l], P->d[l].W, NULL, 0, NULL, P->d[l].W + DK[l] * L, RELU, NULL, w->ar[l + 1]);
        mm(B, w->af[l], DK[l], P->d[l].W, NULL, 0, NULL, P->d[l].W + DK[l] * L, RELU, NULL, w->af[l + 1]);
    }
    real *lr = w->dr[NL - 1], *lf = w->df[NL - 1], *lg = w->dg[NL - 1];  /* logits, then output deltas */
    dots(B, 1, w->ar[NL - 1], P->d[NL - 1].T, NULL, NULL, P->d[NL - 1].b, lr);
    dots(B, 1, w->af[NL - 1], P->d[NL - 1].T, NULL, NULL, P->d[NL - 1].b, lf);
    memset(lg, 0, (size_t)B * L * sizeof(real));
    memset(w->sr, 0, (size_t)B * L * sizeof(real));
    memset(w->sf, 0, (size_t)B * L * sizeof(real));
    /* losses and dL/dlogit = (sigma - y) / B: y = 1 on real rows (L_D), 0 on fake (L_D), 1 on fake (L_G) */
    real inv = (real)1 / B;
    if (losses) {  /* NULL: not wanted (mog.train's steps; ~5% of a step in log1p) */
        real spr = 0, spf = 0, spg = 0;
        for (int r = 0; r < B; r++) {
            real dr = lr[r * L], df = lf[r * L];
            spr += softplus(-dr); spf += softplus(df); spg += softplus(-df);
        }
        losses[0] = spr * inv + spf * inv;
        losses[1] = spg * inv;
    }
    for (int r = 0; r < B; r++) {
        real sr = sigmoid(lr[r * L]), sf = sigmoid(lf[r * L]);
        w->sr[r * L] = sr; w->sf[r * L] = sf;
        lr[r * L] = (sr - 1) * inv; lf[r * L] = sf * inv; lg[r * L] = (sf - 1) * inv;
    }
    /* discriminator backward: u_phi from the L_D rows, deltas of all three row sets */
    for (int l = NL - 1; l >= 1; l--) {
        const layer *p = &P->d[l];
        if (DN[l] < L) {
            outer_t(B, DN[l], w->ar[l], w->dr[l], NULL, NULL, U->d[l].T, U->d[l].b);
            outer_t(B, DN[l], w->af[l], w->df[l], NULL, NULL, U->d[l].T, U->d[l].b);
        } else {
            outer(B, DK[l], w->ar[l], w->dr[l], w->af[l], w->df[l], NULL, NULL, 2, U->d[l].W);
        }
        mm(B, w->dr[l], DN[l], p->T, NULL, 0, NULL, NULL, MASK, w->ar[l], w->dr[l - 1]);
        mm(B, w->df[l], DN[l], p->T, NULL, 0, NULL, NULL, MASK, w->af[l], w->df[l - 1]);
        mm(B, w->dg[l], DN[l], p->T, NULL, 0, NULL, NULL, MASK, w->af[l], w->dg[l - 1]);
    }
    outer(B, DK[0], w->ar[0], w->dr[0], w->af[0], w->df[0], NULL, NULL, 2, U->d[0].W);
    /* dL_G/dx_fake = delta_g W_0^T: 2 dot products with D's input-layer rows */
    dots(B, XD, w->dg[0], P->d[0].W, NULL, NULL, NULL, w->dG[NL - 1]);
    /* generator backward: u_theta */
    for (int l = NL - 1; l >= 1; l--) {
        if (GN[l] < L)
            outer_t(B, GN[l], w->ag[l], w->dG[l], NULL, NULL, U->g[l].T, U->g[l].b);
        else
            outer(B, GK[l], w->ag[l], w->dG[l], NULL, NULL, NULL, NULL, 1, U->g[l].W);
        mm(B, w->dG[l], GN[l], P->g[l].T, NULL, 0, NULL, NULL, MASK, w->ag[l], w->dG[l - 1]);
    }
    outer(B, GK[0], w->ag[0], w->dG[0], NULL, NULL, NULL, NULL, 1, U->g[0].W);
}

/* ---------------------------------------------------------------------------------------------------- */
/* pass 2: H = J_u^T t = H_{L_G}(t_theta, 0) + H_{L_D}(0, t_phi) (forward-over-reverse), rows r0..r0+R   */
/* for the tangent t in w->U (u itself for ConOpt; one-hot for the Jacobian). g_on / d_on say whether     */
/* t_theta / t_phi may be nonzero; the terms of a zero part are skipped.                                  */
/* ---------------------------------------------------------------------------------------------------- */

static void tangent(work *w, int B, int r0, int R, int g_on, int d_on) {
    const net *P = w->P, *U = w->U;
    net *H = w->H;
    const size_t o = (size_t)r0 * L;  /* offset of this chunk in the B-row arrays */
    real *const *ag = w->ag, *const *ar = w->ar, *const *af = w->af, *const *dG = w->dG;
    real *const *dr = w->dr, *const *df = w->df, *const *dg = w->dg;
    real *xt = w->tq[0];  /* tangent of the fake samples = the input tangent of D's L_G fake rows */
    if (g_on) {
        /* tangent forward through G (direction t_theta): tg[l] = tangent of G's activation a_l */
        real *th = w->th[0];
        mm(R, ag[0] + o, GK[0], U->g[0].W, NULL, 0, NULL, U->g[0].W + GK[0] * L, STORE, NULL, th);
        for (int l = 1; l < NL; l++) {
            real *t = w->tg[l];
            mask_rows(R, th, ag[l] + o, t);
            if (GN[l] < L)
                dots(R, GN[l], t, P->g[l].T, ag[l] + o, U->g[l].T, U->g[l].b, th);
            else
                mm(R, t, GK[l], P->g[l].W, ag[l] + o, GK[l], U->g[l].W, U->g[l].W + GK[l] * L, STORE, NULL, th);
        }
        memcpy(xt, th, (size_t)R * L * sizeof(real));
    }
    /* tangent forward through D: real and fake rows of L_D (direction t_phi) and fake rows of L_G (input
     * tangent xt); hr / hf / hq = their pre-activation tangents */
    real *hr = w->th[1], *hf = w->th[2], *hq = w->th[3];
    if (d_on) {
        mm(R, ar[0] + o, DK[0], U->d[0].W, NULL, 0, NULL, U->d[0].W + DK[0] * L, STORE, NULL, hr);
        mm(R, af[0] + o, DK[0], U->d[0].W, NULL, 0, NULL, U->d[0].W + DK[0] * L, STORE, NULL, hf);
    }
    if (g_on) mm(R, xt, DK[0], P->d[0].W, NULL, 0, NULL, NULL, STORE, NULL, hq);
    for (int l = 1; l < NL; l++) {
        real *tr = w->tr[l], *tf = w->tf[l], *tq = w->tq[l];
        if (d_on) {
            mask_rows(R, hr, ar[l] + o, tr);
            mask_rows(R, hf, af[l] + o, tf);
            if (DN[l] < L) {
                dots(R, DN[l], tr, P->d[l].T, ar[l] + o, U->d[l].T, U->d[l].b, hr);
                dots(R, DN[l], tf, P->d[l].T, af[l] + o, U->d[l].T, U->d[l].b, hf);
            } else {
                const real *ub = U->d[l].W + DK[l] * L;
                mm(R, tr, DK[l], P->d[l].W, ar[l] + o, DK[l], U->d[l].W, ub, STORE, NULL, hr);
                mm(R, tf, DK[l], P->d[l].W, af[l] + o, DK[l], U->d[l].W, ub, STORE, NULL, hf);
            }
        }
        if (g_on) {
            mask_rows(R, hq, af[l] + o, tq);
            if (DN[l] < L)
                dots(R, DN[l], tq, P->d[l].T, NULL, NULL, NULL, hq);
            else
                mm(R, tq, DK[l], P->d[l].W, NULL, 0, NULL, NULL, STORE, NULL, hq);
        }
    }
    /* tangent of dL/dlogit = sigma (1 - sigma) / B * tangent of the logit. The fake rows' two tangent
     * deltas (L_D along t_phi, L_G along xt) are summed from here on: same masks, same weights. */
    real inv = (real)1 / B;
    real *er = w->er[0], *es = w->es[0], *er2 = w->er[1], *es2 = w->es[1];
    memset(er, 0, (size_t)R * L * sizeof(real));
    memset(es, 0, (size_t)R * L * sizeof(real));
    for (int r = 0; r < R; r++) {
        real sr = w->sr[o + r * L], sf = w->sf[o + r * L];
        if (d_on) er[r * L] = sr * (1 - sr) * inv * hr[r * L];
        es[r * L] = sf * (1 - sf) * inv * ((d_on ? hf[r * L] : 0) + (g_on ? hq[r * L] : 0));
    }
    /* tangent backward through D:
     *   H_l += a_r^T e_r + t_r^T d_r + a_f^T e_s + t_f^T d_f + t_q^T d_g
     *   e_r <- (e_r W^T + d_r U^T) * mask_r,  e_s <- (e_s W^T + d_f U^T) * mask_f
     * (e_r, t_r, t_f and the U^T terms vanish without t_phi; t_q without t_theta) */
    for (int l = NL - 1; l >= 1; l--) {
        const layer *p = &P->d[l], *u = &U->d[l];
        if (DN[l] < L) {
            if (d_on) outer_t(R, DN[l], ar[l] + o, er, w->tr[l], dr[l] + o, H->d[l].T, H->d[l].b);
            outer_t(R, DN[l], af[l] + o, es, d_on ? w->tf[l] : NULL, df[l] + o, H->d[l].T, H->d[l].b);
            if (g_on) outer_t(R, DN[l], w->tq[l], dg[l] + o, NULL, NULL, H->d[l].T, NULL);
        } else {
            if (d_on) {
                outer(R, DK[l], ar[l] + o, er, af[l] + o, es, w->tr[l], dr[l] + o, 2, H->d[l].W);
                outer(R, DK[l], w->tf[l], df[l] + o, g_on ? w->tq[l] : NULL, dg[l] + o, NULL, NULL, 0, H->d[l].W);
            } else {
                outer(R, DK[l], af[l] + o, es, w->tq[l], dg[l] + o, NULL, NULL, 1, H->d[l].W);
            }
        }
        if (d_on) mm(R, er, DN[l], p->T, dr[l] + o, DN[l], u->T, NULL, MASK, ar[l] + o, er2);
        mm(R, es, DN[l], p->T, d_on ? df[l] + o : NULL, DN[l], u->T, NULL, MASK, af[l] + o, es2);
        real *t = er; er = er2; er2 = t;
        t = es; es = es2; es2 = t;
    }
    if (d_on)
        outer(R, DK[0], ar[0] + o, er, af[0] + o, es, g_on ? xt : NULL, dg[0] + o, 2, H->d[0].W);
    else
        outer(R, DK[0], af[0] + o, es, xt, dg[0] + o, NULL, NULL, 1, H->d[0].W);
    /* into G: the tangent of dL/dx_fake, both fake copies: e_s W_0^T + d_f U_0^T (2 dot products) */
    real *eg = w->eg[0], *eg2 = w->eg[1];
    dots(R, XD, es, P->d[0].W, d_on ? df[0] + o : NULL, U->d[0].W, NULL, eg);
    /* tangent backward through G: H_l += a^T e + t^T dG;  e <- (e W^T + dG U^T) * mask */
    for (int l = NL - 1; l >= 1; l--) {
        const real *tg = g_on ? w->tg[l] : NULL, *dGl = g_on ? dG[l] + o : NULL;
        if (GN[l] < L)
            outer_t(R, GN[l], ag[l] + o, eg, tg, dGl, H->g[l].T, H->g[l].b);
        else
            outer(R, GK[l], ag[l] + o, eg, tg, dGl, NULL, NULL, 1, H->g[l].W);
        mm(R, eg, GN[l], P->g[l].T, dGl, GN[l], U->g[l].T, NULL, MASK, ag[l] + o, eg2);
        real *t = eg; eg = eg2; eg2 = t;
    }
    outer(R, GK[0], ag[0] + o, eg, NULL, NULL, NULL, NULL, 1, H->g[0].W);
}

/* ---------------------------------------------------------------------------------------------------- */
/* entry points (called through ctypes by numgan.mog_native)                                            */
/* ---------------------------------------------------------------------------------------------------- */

/* One seed's direction: u (gamma < 0: SimGA) or u + gamma J_u^T u (ConOpt) into out [2003]; losses [2] =
 * (L_D, L_G) of the minibatch. */
static void direction1(work *w, int B, const real *params, const real *x_real, const real *z, real gamma,
                       real *out, real *losses) {
    load_net(w->P, params);
    primal(w, B, x_real, z, losses);
    store_net(w->U, out);
    if (gamma < 0) return;
    for (int l = 0; l < NL; l++) { finish_layer(&w->U->g[l], GK[l], GN[l]); finish_layer(&w->U->d[l], DK[l], DN[l]); }
    memset(w->H, 0, sizeof(*w->H));
    for (int r0 = 0; r0 < B; r0 += CH) tangent(w, B, r0, B - r0 < CH ? B - r0 : CH, 1, 1);
    real h[NP];
    store_net(w->H, h);
    for (int i = 0; i < NP; i++) out[i] += gamma * h[i];
}

/* S seeds: out [S, 2003], losses [S, 2] (or NULL); params [S, 2003], x_real [S, B, 2], z [S, B, 16]. */
void mog_direction(int S, int B, const real *params, const real *x_real, const real *z, real gamma,
                   real *out, real *losses, void *workspace) {
    work w;
    carve(&w, workspace, B);
    for (int s = 0; s < S; s++)
        direction1(&w, B, params + (size_t)s * NP, x_real + (size_t)s * B * XD, z + (size_t)s * B * ZD, gamma,
                   out + (size_t)s * NP, losses ? losses + 2 * s : NULL);
}

/* S seeds' game step with TF-1 RMSProp (spec 1.3), in place:
 *   g = direction; ms <- decay ms + (1 - decay) g^2; params <- params - lr g / sqrt(ms + eps).
 * one_minus_decay = 1 - decay rounded once from double (as torch's addcmul_ value); grad [S, 2003]
 * receives the directions. */
void mog_step(int S, int B, real *params, real *square_avg, const real *x_real, const real *z, real gamma,
              real lr, real decay, real one_minus_decay, real eps, real *grad, real *losses, void *workspace) {
    mog_direction(S, B, params, x_real, z, gamma, grad, losses, workspace);
    size_t n = (size_t)S * NP;
    for (size_t i = 0; i < n; i++) {
        real g = grad[i];
        real ms = square_avg[i] * decay + g * g * one_minus_decay;
        square_avg[i] = ms;
        params[i] -= lr * g / sqrt(ms + eps);
    }
}

/* Rows row0..row1-1 of the exact game Jacobian v'(x) = -J_u of one seed (paper Sec. 3-4; numgan.mog_fused
 * .jacobian): row i of J_u is H_{L_G} e_i for a generator index i and H_{L_D} e_i for a discriminator
 * index, i.e. the tangent pass along the one-hot direction e_i. out points at row row0 of the [2003, 2003]
 * row-major matrix. */
void mog_jacobian(int B, const real *params, const real *x_real, const real *z, int row0, int row1, real *out,
                  void *workspace) {
    work w;
    carve(&w, workspace, B);
    real losses[2];
    load_net(w.P, params);
    primal(&w, B, x_real, z, losses);
    memset(w.U, 0, sizeof(*w.U));
    for (int i = row0; i < row1; i++) {
        /* locate parameter i: network, layer, row k (K = bias) and output unit n */
        int g_on = i < NG, idx = g_on ? i : i - NG, l = 0;
        const int *Ks = g_on ? GK : DK, *Ns = g_on ? GN : DN;
        while (idx >= (Ks[l] + 1) * Ns[l]) { idx -= (Ks[l] + 1) * Ns[l]; l++; }
        int K = Ks[l], N = Ns[l], k = idx / N, n = idx % N;
        layer *u = g_on ? &w.U->g[l] : &w.U->d[l];
        u->W[k * L + n] = 1;
        if (k < K) u->T[n * L + k] = 1; else u->b[n] = 1;
        memset(w.H, 0, sizeof(*w.H));
        for (int r0 = 0; r0 < B; r0 += CH) tangent(&w, B, r0, B - r0 < CH ? B - r0 : CH, g_on, !g_on);
        real *row = out + (size_t)(i - row0) * NP;
        store_net(w.H, row);
        for (int j = 0; j < NP; j++) row[j] = -row[j];
        u->W[k * L + n] = 0;
        if (k < K) u->T[n * L + k] = 0; else u->b[n] = 0;
    }
}
