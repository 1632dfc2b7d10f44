/* A command-line front end to numgan/mog_native.c, for running the C engine where Python and torch are not
 * (tests/test_mog_native_portability.py builds it for aarch64 and runs it under qemu: the NEON code path on
 * an x86 machine). Built together with mog_native.c, with the same -DREAL (and -DREAL_IS_DOUBLE).
 *
 *   native_driver direction S B gamma          stdin: params [S,2003], x_real [S,B,2], z [S,B,16]
 *                                              stdout: out [S,2003], losses [S,2]   (gamma < 0: SimGA)
 *   native_driver step S B gamma lr decay eps  stdin: params, square_avg [S,2003], x_real, z
 *                                              stdout: params, square_avg, losses (after one step)
 *   native_driver jacobian B row0 row1         stdin: params [2003], x_real [B,2], z [B,16]
 *                                              stdout: rows row0..row1-1 of v' [row1 - row0, 2003]
 *   native_driver width                        stdout: the vector width in bytes, as text
 *
 * Arrays are raw native-endian REAL values. Exit status 1 on bad arguments, 2 on short or excess input (the
 * caller's arrays disagree with these in size or order) or no memory.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef REAL
#define REAL float
#endif
typedef REAL real;
#define NP 2003

size_t mog_work_bytes(int B);
int mog_vector_bytes(void);
void mog_direction(int S, int B, const real *params, const real *x_real, const real *z, real gamma, real *out,
                   real *losses, void *workspace);
void mog_step(int S, int B, real *params, real *square_avg, const real *x_real, const real *z, real gamma, real lr,
              real decay, real one_minus_decay, real eps, real *grad, real *losses, void *workspace);
void mog_jacobian(int B, const real *params, const real *x_real, const real *z, int row0, int row1, real *out,
                  void *workspace);

static void *alloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "native_driver: out of memory (%zu bytes)\n", bytes);
        exit(2);
    }
    return p;
}

static real *take(size_t n) {
    real *p = alloc(n * sizeof(real));
    if (fread(p, sizeof(real), n, stdin) != n) {
        fprintf(stderr, "native_driver: short input (wanted %zu values)\n", n);
        exit(2);
    }
    return p;
}

/* all input read: anything left means the caller's arrays disagree with ours in size or order */
static void end_of_input(void) {
    if (getchar() != EOF) {
        fprintf(stderr, "native_driver: more input than the arrays take\n");
        exit(2);
    }
}

/* a whole-string integer in [lo, hi], else exit 1 */
static int arg_int(const char *s, long lo, long hi) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "native_driver: bad integer argument '%s' (wanted %ld..%ld)\n", s, lo, hi);
        exit(1);
    }
    return (int)v;
}

static double arg_real(const char *s) {
    char *end;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0') {
        fprintf(stderr, "native_driver: bad number '%s'\n", s);
        exit(1);
    }
    return v;
}

static void give(const real *p, size_t n) {
    if (fwrite(p, sizeof(real), n, stdout) != n) exit(3);
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "width")) {
        printf("%d\n", mog_vector_bytes());
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "direction")) {
        int S = arg_int(argv[2], 1, 1 << 20), B = arg_int(argv[3], 1, 1 << 20);
        real gamma = (real)arg_real(argv[4]);
        real *params = take((size_t)S * NP), *x = take((size_t)S * B * 2), *z = take((size_t)S * B * 16);
        end_of_input();
        real *out = alloc((size_t)S * NP * sizeof(real)), *losses = alloc((size_t)S * 2 * sizeof(real));
        mog_direction(S, B, params, x, z, gamma, out, losses, alloc(mog_work_bytes(B)));
        give(out, (size_t)S * NP);
        give(losses, (size_t)S * 2);
        return 0;
    }
    if (argc == 8 && !strcmp(argv[1], "step")) {
        int S = arg_int(argv[2], 1, 1 << 20), B = arg_int(argv[3], 1, 1 << 20);
        double gamma = arg_real(argv[4]), lr = arg_real(argv[5]), decay = arg_real(argv[6]), eps = arg_real(argv[7]);
        real *params = take((size_t)S * NP), *ms = take((size_t)S * NP);
        real *x = take((size_t)S * B * 2), *z = take((size_t)S * B * 16);
        end_of_input();
        real *grad = alloc((size_t)S * NP * sizeof(real)), *losses = alloc((size_t)S * 2 * sizeof(real));
        /* 1 - decay rounded once from double, as numgan.mog_native.step passes it */
        mog_step(S, B, params, ms, x, z, (real)gamma, (real)lr, (real)decay, (real)(1.0 - decay), (real)eps, grad,
                 losses, alloc(mog_work_bytes(B)));
        give(params, (size_t)S * NP);
        give(ms, (size_t)S * NP);
        give(losses, (size_t)S * 2);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "jacobian")) {
        int B = arg_int(argv[2], 1, 1 << 20), row0 = arg_int(argv[3], 0, NP - 1), row1 = arg_int(argv[4], row0 + 1, NP);
        real *params = take(NP), *x = take((size_t)B * 2), *z = take((size_t)B * 16);
        end_of_input();
        real *out = alloc((size_t)(row1 - row0) * NP * sizeof(real));
        mog_jacobian(B, params, x, z, row0, row1, out, alloc(mog_work_bytes(B)));
        give(out, (size_t)(row1 - row0) * NP);
        return 0;
    }
    fprintf(stderr, "usage: native_driver direction S B gamma | step S B gamma lr decay eps | "
                    "jacobian B row0 row1 | width\n");
    return 1;
}
