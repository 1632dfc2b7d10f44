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
 * Arrays are raw native-endian REAL values; the exit status is nonzero on bad arguments or short input.
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

static real *take(size_t n) {
    real *p = malloc(n * sizeof(real) + 1);
    if (!p || fread(p, sizeof(real), n, stdin) != n) {
        fprintf(stderr, "native_driver: short input (wanted %zu values)\n", n);
        exit(2);
    }
    return p;
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
        int S = atoi(argv[2]), B = atoi(argv[3]);
        real gamma = (real)atof(argv[4]);
        real *params = take((size_t)S * NP), *x = take((size_t)S * B * 2), *z = take((size_t)S * B * 16);
        real *out = malloc((size_t)S * NP * sizeof(real)), *losses = malloc((size_t)S * 2 * sizeof(real));
        void *work = malloc(mog_work_bytes(B));
        mog_direction(S, B, params, x, z, gamma, out, losses, work);
        give(out, (size_t)S * NP);
        give(losses, (size_t)S * 2);
        return 0;
    }
    if (argc == 8 && !strcmp(argv[1], "step")) {
        int S = atoi(argv[2]), B = atoi(argv[3]);
        double decay = atof(argv[6]);
        real *params = take((size_t)S * NP), *ms = take((size_t)S * NP);
        real *x = take((size_t)S * B * 2), *z = take((size_t)S * B * 16);
        real *grad = malloc((size_t)S * NP * sizeof(real)), *losses = malloc((size_t)S * 2 * sizeof(real));
        void *work = malloc(mog_work_bytes(B));
        mog_step(S, B, params, ms, x, z, (real)atof(argv[4]), (real)atof(argv[5]), (real)decay, (real)(1.0 - decay),
                 (real)atof(argv[7]), grad, losses, work);
        give(params, (size_t)S * NP);
        give(ms, (size_t)S * NP);
        give(losses, (size_t)S * 2);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "jacobian")) {
        int B = atoi(argv[2]), row0 = atoi(argv[3]), row1 = atoi(argv[4]);
        if (row0 < 0 || row1 > NP || row1 <= row0) return 1;
        real *params = take(NP), *x = take((size_t)B * 2), *z = take((size_t)B * 16);
        real *out = malloc((size_t)(row1 - row0) * NP * sizeof(real));
        void *work = malloc(mog_work_bytes(B));
        mog_jacobian(B, params, x, z, row0, row1, out, work);
        give(out, (size_t)(row1 - row0) * NP);
        return 0;
    }
    fprintf(stderr, "usage: native_driver direction S B gamma | step S B gamma lr decay eps | "
                    "jacobian B row0 row1 | width\n");
    return 1;
}
