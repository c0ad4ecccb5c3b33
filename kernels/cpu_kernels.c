/* Fused CPU kernels. First the sLSTM's per-step pointwise work: one call per time step instead of ~15 PyTorch
 * operations (whose launch overhead, not arithmetic, is what a step costs in eager PyTorch).
 *
 * Built and loaded by kernels/cpu.py (ctypes); the recurrent matmul h_{t-1} R of each step stays a
 * PyTorch (MKL/oneDNN) batched matmul. The formulas are those of xlstm_hf/cells.py:
 *
 *   forward  (cells.slstm_pointwise):   m = max(log sigmoid(f~) + m_prev, i~),  i = exp(i~ - m),
 *            f = exp(log sigmoid(f~) + m_prev - m),  c = f c_prev + i tanh(z~),  n = f n_prev + i,
 *            h = sigmoid(o~) c / n;  a padded step (keep = 0) copies the previous state.
 *   backward (slstm_autograd.slstm_backward's step): the coefficients of the step (computed beforehand,
 *            vectorised over a block of steps) applied to dh and the carried (dc, dn).
 *
 * Layouts (all contiguous in the last dimension; strides in elements):
 *   raw      one step's gate pre-activations (NH, B, 4, DH), heads `raw_head` apart; the forward receives
 *            x + b there and adds hr, the step's recurrent term h_{t-1} R (NH, B, 4, DH) contiguous
 *   h_next   the new h once more, contiguous (NH, B, DH): the next step's matmul input
 *   states   h, c, n, m of one step (NH, B, DH) each, heads `h_head` (h) or `state_head` (c, n, m) apart,
 *            the previous and the new step's alike
 *   keep     one step's (B,) flags, or NULL: no padding
 * Each function exists for float and double (tests run in float64).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GLIBC__)
/* glibc's vector math library (libmvec): lets the compiler vectorise exp, log1p and tanh without
 * -ffast-math, which would also assume no inf (m starts at -inf) */
__attribute__((simd("notinbranch"))) float expf(float);
__attribute__((simd("notinbranch"))) float log1pf(float);
__attribute__((simd("notinbranch"))) float tanhf(float);
__attribute__((simd("notinbranch"))) double exp(double);
__attribute__((simd("notinbranch"))) double log1p(double);
__attribute__((simd("notinbranch"))) double tanh(double);
#endif

#define SLSTM_STEPS(T, SUFFIX, EXP, LOG1P, TANH)                                                             \
    void slstm_forward_step_##SUFFIX(int64_t NH, int64_t B, int64_t DH, T *raw, int64_t raw_head,           \
                                     const T *hr, T *h_next,                                               \
                                     const T *h_prev, const T *c_prev, const T *n_prev, const T *m_prev,   \
                                     T *h_new, T *c_new, T *n_new, T *m_new, int64_t h_head,               \
                                     int64_t state_head, const uint8_t *keep) {                            \
        for (int64_t head = 0; head < NH; head++) {                                                        \
            for (int64_t b = 0; b < B; b++) {                                                              \
                const int64_t s = head * state_head + b * DH, sh = head * h_head + b * DH;                 \
                if (keep && !keep[b]) { /* padding: the state passes through unchanged */                  \
                    memcpy(h_new + sh, h_prev + sh, DH * sizeof(T));                                       \
                    memcpy(h_next + (head * B + b) * DH, h_prev + sh, DH * sizeof(T));                     \
                    memcpy(c_new + s, c_prev + s, DH * sizeof(T));                                         \
                    memcpy(n_new + s, n_prev + s, DH * sizeof(T));                                         \
                    memcpy(m_new + s, m_prev + s, DH * sizeof(T));                                         \
                    continue;                                                                              \
                }                                                                                          \
                T *gi = raw + head * raw_head + b * 4 * DH, *gf = gi + DH, *gz = gf + DH, *go = gz + DH;   \
                const T *ri = hr + (head * B + b) * 4 * DH, *rf = ri + DH, *rz = rf + DH, *ro = rz + DH;   \
                const T *cp = c_prev + s, *np = n_prev + s, *mp = m_prev + s;                              \
                T *hn = h_new + sh, *hx = h_next + (head * B + b) * DH;                                    \
                T *cn = c_new + s, *nn = n_new + s, *mn = m_new + s;                                       \
                _Pragma("omp simd")                                                                        \
                for (int64_t j = 0; j < DH; j++) { /* the pre-activations x + b + h R, kept for the backward */ \
                    gi[j] += ri[j];                                                                        \
                    gf[j] += rf[j];                                                                        \
                    gz[j] += rz[j];                                                                        \
                    go[j] += ro[j];                                                                        \
                }                                                                                          \
                _Pragma("omp simd")                                                                        \
                for (int64_t j = 0; j < DH; j++) {                                                         \
                    const T f = gf[j];                                                                     \
                    /* log sigmoid(f) = min(f, 0) - log1p(exp(-|f|)), as torch computes it */              \
                    const T log_f_m = mp[j] + ((f < 0 ? f : 0) - LOG1P(EXP(-fabs(f))));                    \
                    const T m = gi[j] > log_f_m ? gi[j] : log_f_m;                                         \
                    const T i_gate = EXP(gi[j] - m), f_gate = EXP(log_f_m - m);                            \
                    const T c = f_gate * cp[j] + i_gate * TANH(gz[j]);                                     \
                    const T n = f_gate * np[j] + i_gate;                                                   \
                    const T o = 1 / (1 + EXP(-go[j]));                                                     \
                    hn[j] = hx[j] = o * c / n;                                                             \
                    cn[j] = c;                                                                             \
                    nn[j] = n;                                                                             \
                    mn[j] = m;                                                                             \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    /* One backward step. coef: this step's 9 coefficient planes (see slstm_autograd._backward_coefficients), \
     * each (NH, B, DH) with heads `coef_head` apart and planes `coef_plane` apart; dh, dcn (2, NH, B, DH)   \
     * and dh_prev contiguous; d_raw: this step's (NH, B, 4, DH) gradient, heads `raw_head` apart;         \
     * d_out_prev: the output gradient of the previous step (NH, B, DH), heads `out_head` apart, or NULL   \
     * (first step). Writes d_raw, updates dcn to (dc, dn) of the previous step and writes dh_prev (the    \
     * previous step's gradient before its recurrent term): d_out_prev + dh where this step is padding. */ \
    void slstm_backward_step_##SUFFIX(int64_t NH, int64_t B, int64_t DH, const T *coef, int64_t coef_plane, \
                                      int64_t coef_head, const T *dh, T *dcn, T *d_raw, int64_t raw_head,  \
                                      const T *d_out_prev, int64_t out_head, T *dh_prev,                   \
                                      const uint8_t *keep) {                                               \
        const int64_t plane = NH * B * DH;                                                                 \
        for (int64_t head = 0; head < NH; head++) {                                                        \
            for (int64_t b = 0; b < B; b++) {                                                              \
                const int64_t s = (head * B + b) * DH;                                                     \
                const T *k = coef + head * coef_head + b * DH;                                             \
                const T *dh_s = dh + s;                                                                    \
                T *dc = dcn + s, *dn = dcn + plane + s, *dh_p = dh_prev + s;                               \
                T *di = d_raw + head * raw_head + b * 4 * DH, *df = di + DH, *dz = df + DH, *d_o = dz + DH; \
                const T *dop = d_out_prev ? d_out_prev + head * out_head + b * DH : 0;                     \
                const T pass = (keep && !keep[b]) ? 1 : 0;                                                 \
                _Pragma("omp simd")                                                                        \
                for (int64_t j = 0; j < DH; j++) {                                                         \
                    const T g = dh_s[j];                                                                   \
                    const T dc_t = dc[j] + g * k[j];                                                       \
                    const T dn_t = dn[j] + g * k[coef_plane + j];                                          \
                    di[j] = k[2 * coef_plane + j] * dc_t + k[5 * coef_plane + j] * dn_t;                   \
                    df[j] = k[3 * coef_plane + j] * dc_t + k[6 * coef_plane + j] * dn_t;                   \
                    dz[j] = k[4 * coef_plane + j] * dc_t;                                                  \
                    d_o[j] = g * k[7 * coef_plane + j];                                                    \
                    dc[j] = dc_t * k[8 * coef_plane + j];                                                  \
                    dn[j] = dn_t * k[8 * coef_plane + j];                                                  \
                    dh_p[j] = (dop ? dop[j] : 0) + g * pass;                                               \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }

SLSTM_STEPS(float, f32, expf, log1pf, tanhf)
SLSTM_STEPS(double, f64, exp, log1p, tanh)

/* ---------------------------------------------------------------------------------------------------
 * Decoding: the mLSTM state update with its read-out, and a matrix times a few vectors. Both are
 * memory-bound (C and the weights are far larger than the caches), so each streams its big operand
 * exactly once, split over the threads of PyTorch's own OpenMP runtime (the library links the
 * libgomp.so.1 that torch has already loaded, so the two share one thread pool).
 * ------------------------------------------------------------------------------------------------- */

/* For each of the BH (batch, head) pairs, in place: C <- decay C + gk v^T, and num = q^T C (the new C),
 * in one pass over C. C: (BH, DK, DV); q, gk: (BH, DK); v, num: (BH, DV); decay: (BH,); contiguous.
 * (cells.mlstm_step computes num as decay q^T C_old + (q . gk) v: the same, rounded in another order.) */
#define MLSTM_STEP(T, SUFFIX)                                                                                \
    void mlstm_step_update_##SUFFIX(int64_t BH, int64_t DK, int64_t DV, T *C, const T *q, const T *gk,    \
                                    const T *v, const T *decay, T *num) {                                 \
        _Pragma("omp parallel for schedule(static)")                                                       \
        for (int64_t bh = 0; bh < BH; bh++) {                                                              \
            T *out = num + bh * DV;                                                                        \
            const T *vb = v + bh * DV, d = decay[bh];                                                      \
            for (int64_t j = 0; j < DV; j++) out[j] = 0;                                                   \
            for (int64_t r = 0; r < DK; r++) {                                                             \
                T *row = C + (bh * DK + r) * DV;                                                           \
                const T a = gk[bh * DK + r], w = q[bh * DK + r];                                           \
                _Pragma("omp simd")                                                                        \
                for (int64_t j = 0; j < DV; j++) {                                                         \
                    const T c = d * row[j] + a * vb[j];                                                    \
                    row[j] = c;                                                                            \
                    out[j] += w * c;                                                                       \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }

MLSTM_STEP(float, f32)
MLSTM_STEP(double, f64)

/* y = x W^T (+ bias) for R <= 8 rows of x: W (O, I), x (R, I), y (R, O), bias (O,) or NULL; contiguous.
 * Each row of W is read once and multiplied with all R rows of x, which stay in L1, in vector registers
 * (GCC vector extensions: 64-byte vectors, split by the compiler where the CPU has narrower ones): three
 * rows of W at a time, 3 x R accumulators. W is prefetched ~96 KB ahead: with R rows of work per byte the
 * hardware prefetcher alone left a thread at a quarter of the memory bandwidth (the LM head, 8 rows:
 * 5 -> 10 GB/s per thread). The threads take blocks of rows of W. */
#define MATVEC_W 3                   /* rows of W per iteration */
#define MATVEC_PREFETCH (96 * 1024)  /* bytes */
#define MATVEC(T, SUFFIX)                                                                                    \
    typedef T vec_##SUFFIX __attribute__((vector_size(64)));                                               \
    static inline __attribute__((always_inline)) void matvec_rows_##SUFFIX(                                \
        const int64_t R, int64_t I, int64_t O, const T *x, const T *W, const T *bias, T *y) {              \
        enum { L = 64 / sizeof(T) };                                                                       \
        const int64_t I_vec = I - I % L, ahead = MATVEC_PREFETCH / sizeof(T);                              \
        _Pragma("omp parallel for schedule(static)")                                                       \
        for (int64_t o0 = 0; o0 < O; o0 += MATVEC_W) {                                                     \
            const int64_t rows = O - o0 < MATVEC_W ? O - o0 : MATVEC_W;                                    \
            vec_##SUFFIX acc[MATVEC_W][8] = {{0}};                                                         \
            for (int64_t i = 0; i < I_vec; i += L) {                                                       \
                vec_##SUFFIX w[MATVEC_W];                                                                  \
                for (int64_t k = 0; k < MATVEC_W; k++) {                                                   \
                    const T *p = W + (o0 + (k < rows ? k : 0)) * I + i; /* past O: reload a valid row */   \
                    memcpy(&w[k], p, sizeof w[k]);                                                         \
                    __builtin_prefetch(p + ahead); /* a hint: never faults, also past the end of W */      \
                }                                                                                          \
                for (int64_t r = 0; r < R; r++) {                                                          \
                    vec_##SUFFIX xr;                                                                       \
                    memcpy(&xr, x + r * I + i, sizeof xr);                                                 \
                    for (int64_t k = 0; k < MATVEC_W; k++) acc[k][r] += w[k] * xr;                          \
                }                                                                                          \
            }                                                                                              \
            for (int64_t k = 0; k < rows; k++) {                                                           \
                for (int64_t r = 0; r < R; r++) {                                                          \
                    T sum = 0;                                                                             \
                    for (int64_t l = 0; l < L; l++) sum += acc[k][r][l];                                   \
                    for (int64_t i = I_vec; i < I; i++) sum += W[(o0 + k) * I + i] * x[r * I + i];         \
                    y[r * O + o0 + k] = sum + (bias ? bias[o0 + k] : 0);                                   \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
    /* R is a constant in each call below, so that the accumulators stay in registers */                  \
    void matvec_##SUFFIX(int64_t R, int64_t I, int64_t O, const T *x, const T *W, const T *bias, T *y) {   \
        switch (R) {                                                                                       \
            case 1: matvec_rows_##SUFFIX(1, I, O, x, W, bias, y); break;                                   \
            case 2: matvec_rows_##SUFFIX(2, I, O, x, W, bias, y); break;                                   \
            case 3: matvec_rows_##SUFFIX(3, I, O, x, W, bias, y); break;                                   \
            case 4: matvec_rows_##SUFFIX(4, I, O, x, W, bias, y); break;                                   \
            case 5: matvec_rows_##SUFFIX(5, I, O, x, W, bias, y); break;                                   \
            case 6: matvec_rows_##SUFFIX(6, I, O, x, W, bias, y); break;                                   \
            case 7: matvec_rows_##SUFFIX(7, I, O, x, W, bias, y); break;                                   \
            default: matvec_rows_##SUFFIX(8, I, O, x, W, bias, y); break;                                  \
        }                                                                                                  \
    }

MATVEC(float, f32)
MATVEC(double, f64)

/* ---------------------------------------------------------------------------------------------------
 * The causal depthwise convolution of the mLSTM block, without gradients (prefill): one pass over the
 * input where PyTorch makes K + 1 (a concatenation with the carried window, then K multiply-adds).
 *
 *   y[b, t, f] = bias[f] + sum_j w[j, f] x[b, t - K + 1 + j, f]   (x before t = 0: the window, or zeros)
 *
 * x: (B, T, F) with strides (x_batch, x_time, 1) (a strided half of the up-projection); window: (B, K-1, F)
 * contiguous, or NULL for zeros; w: (K, F) contiguous (the nn.Conv1d weight transposed); bias: (F,);
 * y: (B, T, F) contiguous. Threads take (b, t) rows.
 * ------------------------------------------------------------------------------------------------- */
#define CAUSAL_CONV(T_, SUFFIX)                                                                              \
    void causal_conv_##SUFFIX(int64_t B, int64_t T, int64_t F, int64_t K, const T_ *x, int64_t x_batch,     \
                              int64_t x_time, const T_ *window, const T_ *w, const T_ *bias, T_ *y) {       \
        _Pragma("omp parallel for schedule(static)")                                                       \
        for (int64_t bt = 0; bt < B * T; bt++) {                                                           \
            const int64_t b = bt / T, t = bt % T;                                                          \
            T_ *out = y + bt * F;                                                                          \
            for (int64_t f = 0; f < F; f++) out[f] = bias[f];                                              \
            for (int64_t j = 0; j < K; j++) {                                                              \
                const int64_t s = t - K + 1 + j; /* the input position this tap reads */                   \
                const T_ *src = s >= 0 ? x + b * x_batch + s * x_time                                      \
                                       : (window ? window + (b * (K - 1) + (K - 1 + s)) * F : 0);          \
                if (!src) continue; /* zeros before the sequence */                                        \
                const T_ *wj = w + j * F;                                                                  \
                _Pragma("omp simd")                                                                        \
                for (int64_t f = 0; f < F; f++) out[f] += wj[f] * src[f];                                  \
            }                                                                                              \
        }                                                                                                  \
    }

CAUSAL_CONV(float, f32)
CAUSAL_CONV(double, f64)
