// CPU kernels of models/kernels.py: group norm (fused with SPADE, FiLM and SiLU), SiLU and
// guided-diffusion's legacy attention, each with its backward. C++ with OpenMP, compiled by
// Jittor (-Ofast -fopenmp -march=native) when a jt.code op first includes this file.
//
// Why a header: Jittor rebuilds every op's kernel key from its cpu_header and cpu_src text on
// each run, character by character for the source (3 KB of source cost 10 us per call, a fifth
// of a small group norm). The ops therefore include this file (its path and content hash are the
// whole header text) and their source is one call. All tensors are contiguous float32.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

#ifdef IIDM_WITH_SGEMM
// oneDNN's C API (dnnl.h, DNNL 2.2 shipped by jittor-offline); the library is already loaded by
// Jittor's own matmul and convolution ops, so only the function is declared.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                          float* C, int64_t ldc);
#endif

namespace iidm {

// exp for float32 as inline arithmetic that GCC vectorises (AVX-512 here): the SiLU kernel at
// 4x64x24x32 on 2 threads, compiled alone, takes 53-58 us with std::exp (glibc's vector expf)
// and 33-42 us with this (medians of three runs). Cody-Waite
// reduction v = n ln2 + r, |r| <= ln2 / 2 (with explicit fma: -Ofast would otherwise fold the two
// ln2 parts into one constant), Cephes' degree-7 polynomial for exp(r), 2^n from the exponent
// bits. Relative error at most 7.4e-8 on [-87.3, 88.3] (numpy's float32 exp: 2.0e-7). The input
// is clamped to [-87.33, 88.37]: below, results stay at about 1.2e-38 (or 0 where denormals are
// flushed); above, at 2.4e38 instead of inf. Harmless where the kernels use it: softmax arguments
// are <= 0, and sigmoid 1 / (1 + exp(-v)) below v = -88.37 gives at most 4.2e-39 instead of less.
static inline float fast_exp(float v) {
    v = v < -87.33654f ? -87.33654f : (v > 88.37f ? 88.37f : v);
    const float n = std::nearbyint(v * 1.44269504088896341f);
    float r = std::fma(n, -0.693359375f, v);
    r = std::fma(n, 2.12194440e-4f, r);
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

// Sum of term(i) for i in [0, n): float32 within blocks of 256 (16 adds per vector lane), float64
// across blocks. A block's rounding is a few float32 ulps of a partial sum, far below the group
// norm output's own rounding (tested at mean 100 against float64), and the kernels run 20% faster
// than with every element converted to float64 (they are compute bound). Pass term as a lambda
// capturing by value: with [&] GCC 12 left the loop scalar (6x slower).
template <class Term>
static inline double block_sum(long n, Term term) {
    double total = 0.0;
    for (long start = 0; start < n; start += 256) {
        const long end = start + 256 < n ? start + 256 : n;
        float block = 0.0f;
        #pragma omp simd reduction(+:block)
        for (long i = start; i < end; i++) block += term(i);
        total += block;
    }
    return total;
}

// ------------------------------------------------------------------------------ group norm
// x, y, gamma, beta, dx, dgamma, dbeta: [N, C, S]; weight, bias: [C]; scale, shift, dweight,
// dbias, dscale, dshift: [N, C]; stats: [N, G, 2], each group's mean and 1 / std. Absent
// operands are null (their flag is false and their branch compiled out). One task per (sample,
// group); the threads take tasks when the tensor has at least parallel_min elements.
//
// z = (x - mean) * rstd * weight_c + bias_c;  z = z * (1 + gamma) + beta;
// z = z * (1 + scale_nc) + shift_nc;  y = z * sigmoid(z).
// Two-pass statistics: the mean first, then the mean squared deviation.
template <bool AFFINE, bool SPATIAL, bool CHANNEL, bool SILU>
static void group_norm_forward(const float* __restrict__ x, const float* __restrict__ weight,
                               const float* __restrict__ bias, const float* __restrict__ gamma,
                               const float* __restrict__ beta, const float* __restrict__ scale,
                               const float* __restrict__ shift, float* __restrict__ y,
                               float* __restrict__ stats,
                               int N, int C, long S, int G, float eps, long parallel_min) {
    const int Cg = C / G;
    const long L = (long)Cg * S;
    #pragma omp parallel for schedule(static) if ((long)N * C * S >= parallel_min)
    for (int task = 0; task < N * G; task++) {
        const int n = task / G, g = task % G;
        const long base = ((long)n * C + (long)g * Cg) * S;
        const float mu = (float)(block_sum(L, [=](long i) { return x[base + i]; }) / (double)L);
        const double squares = block_sum(L, [=](long i) {
            const float d = x[base + i] - mu;
            return d * d;
        });
        const float rs = (float)(1.0 / std::sqrt(squares / (double)L + (double)eps));
        stats[2 * task] = mu;
        stats[2 * task + 1] = rs;
        for (int cc = 0; cc < Cg; cc++) {
            const int c = g * Cg + cc;
            const long nc = (long)n * C + c;
            const long off = nc * S;
            const float a = AFFINE ? rs * weight[c] : rs;
            const float b = AFFINE ? bias[c] : 0.0f;
            const float sc = CHANNEL ? 1.0f + scale[nc] : 1.0f;
            const float sh = CHANNEL ? shift[nc] : 0.0f;
            #pragma omp simd
            for (long s = 0; s < S; s++) {
                float z = (x[off + s] - mu) * a + b;
                if (SPATIAL) z = z * (1.0f + gamma[off + s]) + beta[off + s];
                if (CHANNEL) z = z * sc + sh;
                if (SILU) z = z / (1.0f + fast_exp(-z));
                y[off + s] = z;
            }
        }
    }
}

// Backward of the forward above. Per element, with xh = (x - mean) * rstd:
//   u = xh * w + b,  m = u * (1 + gamma) + beta,  z = m * (1 + scale) + shift
//   gz = gy * sig(z) * (1 + z * (1 - sig(z)))          (SiLU')
//   dshift_nc = sum gz, dscale_nc = sum gz * m;  gm = gz * (1 + scale)
//   dbeta = gm, dgamma = gm * u;                  gu = gm * (1 + gamma)
//   dweight_nc = sum gu * xh, dbias_nc = sum gu;  gxh = gu * w
//   dx = rstd * (gxh - mean_group(gxh) - xh * mean_group(gxh * xh))
// The per-channel sums are per sample ([N, C]); the caller sums them over N.
template <bool AFFINE, bool SPATIAL, bool CHANNEL, bool SILU>
static void group_norm_backward(const float* __restrict__ x, const float* __restrict__ stats,
                                const float* __restrict__ weight,
                                const float* __restrict__ bias, const float* __restrict__ gamma,
                                const float* __restrict__ beta, const float* __restrict__ scale,
                                const float* __restrict__ shift, const float* __restrict__ gy,
                                float* __restrict__ dx, float* __restrict__ dweight,
                                float* __restrict__ dbias, float* __restrict__ dgamma,
                                float* __restrict__ dbeta, float* __restrict__ dscale,
                                float* __restrict__ dshift, int N, int C, long S, int G,
                                long parallel_min) {
    const int Cg = C / G;
    const long L = (long)Cg * S;
    #pragma omp parallel for schedule(static) if ((long)N * C * S >= parallel_min)
    for (int task = 0; task < N * G; task++) {
        const int n = task / G, g = task % G;
        const float mu = stats[2 * task], rs = stats[2 * task + 1];
        double sum_g = 0.0, sum_gx = 0.0;
        for (int cc = 0; cc < Cg; cc++) {
            const int c = g * Cg + cc;
            const long nc = (long)n * C + c;
            const long off = nc * S;
            const float w = AFFINE ? weight[c] : 1.0f;
            const float b = AFFINE ? bias[c] : 0.0f;
            const float sc = CHANNEL ? 1.0f + scale[nc] : 1.0f;
            const float sh = CHANNEL ? shift[nc] : 0.0f;
            double acc_w = 0.0, acc_b = 0.0, acc_sc = 0.0, acc_sh = 0.0;
            for (long start = 0; start < S; start += 256) {  // float32 sums per block, as block_sum
                const long end = start + 256 < S ? start + 256 : S;
                float block_w = 0.0f, block_b = 0.0f, block_sc = 0.0f, block_sh = 0.0f;
                float block_g = 0.0f, block_gx = 0.0f;
                #pragma omp simd reduction(+:block_w, block_b, block_sc, block_sh, block_g, block_gx)
                for (long s = start; s < end; s++) {
                    const float xh = (x[off + s] - mu) * rs;
                    const float u = xh * w + b;
                    const float m = SPATIAL ? u * (1.0f + gamma[off + s]) + beta[off + s] : u;
                    float gz = gy[off + s];
                    if (SILU) {
                        const float z = m * sc + sh;
                        const float sig = 1.0f / (1.0f + fast_exp(-z));
                        gz *= sig * (1.0f + z * (1.0f - sig));
                    }
                    if (CHANNEL) { block_sh += gz; block_sc += gz * m; }
                    const float gm = gz * sc;
                    float gu = gm;
                    if (SPATIAL) {
                        dbeta[off + s] = gm;
                        dgamma[off + s] = gm * u;
                        gu = gm * (1.0f + gamma[off + s]);
                    }
                    if (AFFINE) { block_w += gu * xh; block_b += gu; }
                    const float gxh = gu * w;
                    block_g += gxh;
                    block_gx += gxh * xh;
                    dx[off + s] = gxh;
                }
                acc_w += block_w; acc_b += block_b; acc_sc += block_sc; acc_sh += block_sh;
                sum_g += block_g; sum_gx += block_gx;
            }
            if (AFFINE) { dweight[nc] = (float)acc_w; dbias[nc] = (float)acc_b; }
            if (CHANNEL) { dscale[nc] = (float)acc_sc; dshift[nc] = (float)acc_sh; }
        }
        const float m1 = (float)(sum_g / (double)L), m2 = (float)(sum_gx / (double)L);
        const long base = ((long)n * C + (long)g * Cg) * S;
        #pragma omp simd
        for (long i = 0; i < L; i++) {
            const float xh = (x[base + i] - mu) * rs;
            dx[base + i] = rs * (dx[base + i] - m1 - xh * m2);
        }
    }
}

// ------------------------------------------------------------------------------------ SiLU
// ``parallel`` and ``for simd`` are separate constructs: GCC 12 compiles the combined
// ``parallel for simd`` with a false ``if`` clause to a scalar loop (measured 10x slower).

static void silu_forward(const float* __restrict__ x, float* __restrict__ y, long total,
                         long parallel_min) {
    #pragma omp parallel if (total >= parallel_min)
    {
        #pragma omp for simd schedule(static)
        for (long i = 0; i < total; i++) {
            const float v = x[i];
            y[i] = v / (1.0f + fast_exp(-v));
        }
    }
}

// d/dx [x * sig(x)] = sig(x) * (1 + x * (1 - sig(x)))
static void silu_backward(const float* __restrict__ x, const float* __restrict__ gy,
                          float* __restrict__ dx, long total, long parallel_min) {
    #pragma omp parallel if (total >= parallel_min)
    {
        #pragma omp for simd schedule(static)
        for (long i = 0; i < total; i++) {
            const float v = x[i];
            const float sig = 1.0f / (1.0f + fast_exp(-v));
            dx[i] = gy[i] * sig * (1.0f + v * (1.0f - sig));
        }
    }
}

// ------------------------------------------------------------------------------- attention
#ifdef IIDM_WITH_SGEMM
// Row-major sgemm on per-head blocks q, k, v [c, T] of qkv [BH, 3c, T]:
//   w = alpha * q^T k [T, S];  w = softmax_s(w);  out = v w^T [c, T].
// Heads run in parallel when there are at least as many as threads (sgemm then runs on one
// thread); otherwise heads run in turn and sgemm and the softmax rows use the threads.
static void attention_forward(const float* __restrict__ qkv, float* __restrict__ out,
                              float* __restrict__ weight, int64_t BH, int64_t C, int64_t T,
                              float alpha, long parallel_min) {
    const bool across_heads = BH >= omp_get_max_threads();
    #pragma omp parallel for schedule(static) if (across_heads)
    for (int64_t h = 0; h < BH; h++) {
        const float* q = qkv + h * 3 * C * T;
        const float* k = q + C * T;
        const float* v = k + C * T;
        float* w = weight + h * T * T;
        dnnl_sgemm('T', 'N', T, T, C, alpha, q, T, k, T, 0.0f, w, T);
        #pragma omp parallel for schedule(static) if (!across_heads && T * T >= parallel_min)
        for (int64_t t = 0; t < T; t++) {
            float* row = w + t * T;
            float top = row[0];
            for (int64_t s = 1; s < T; s++) top = row[s] > top ? row[s] : top;
            double total = 0.0;
            #pragma omp simd reduction(+:total)
            for (int64_t s = 0; s < T; s++) {
                const float e = fast_exp(row[s] - top);
                row[s] = e;
                total += e;
            }
            const float inverse = (float)(1.0 / total);
            #pragma omp simd
            for (int64_t s = 0; s < T; s++) row[s] *= inverse;
        }
        dnnl_sgemm('N', 'T', C, T, T, 1.0f, v, T, w, T, 0.0f, out + h * C * T, T);
    }
}

// Given g = d loss / d out [c, T] per head and the saved softmax w [T, S]:
//   dv = g w;  dw = g^T v;  dw_ts = w_ts (dw_ts - sum_s' dw_ts' w_ts')   (softmax')
//   dq = alpha k dw^T;  dk = alpha q dw
// dweight [BH, T, T] is scratch.
static void attention_backward(const float* __restrict__ qkv, const float* __restrict__ weight,
                               const float* __restrict__ gy, float* __restrict__ dqkv,
                               float* __restrict__ dweight, int64_t BH, int64_t C, int64_t T,
                               float alpha, long parallel_min) {
    const bool across_heads = BH >= omp_get_max_threads();
    #pragma omp parallel for schedule(static) if (across_heads)
    for (int64_t h = 0; h < BH; h++) {
        const float* q = qkv + h * 3 * C * T;
        const float* k = q + C * T;
        const float* v = k + C * T;
        const float* w = weight + h * T * T;
        const float* g = gy + h * C * T;
        float* dq = dqkv + h * 3 * C * T;
        float* dk = dq + C * T;
        float* dv = dk + C * T;
        float* dw = dweight + h * T * T;
        dnnl_sgemm('N', 'N', C, T, T, 1.0f, g, T, w, T, 0.0f, dv, T);
        dnnl_sgemm('T', 'N', T, T, C, 1.0f, g, T, v, T, 0.0f, dw, T);
        #pragma omp parallel for schedule(static) if (!across_heads && T * T >= parallel_min)
        for (int64_t t = 0; t < T; t++) {
            float* row = dw + t * T;
            const float* wrow = w + t * T;
            double dot = 0.0;
            #pragma omp simd reduction(+:dot)
            for (int64_t s = 0; s < T; s++) dot += row[s] * wrow[s];
            const float d = (float)dot;
            #pragma omp simd
            for (int64_t s = 0; s < T; s++) row[s] = wrow[s] * (row[s] - d);
        }
        dnnl_sgemm('N', 'T', C, T, T, alpha, k, T, dw, T, 0.0f, dq, T);
        dnnl_sgemm('N', 'N', C, T, T, alpha, q, T, dw, T, 0.0f, dk, T);
    }
}
#endif

}  // namespace iidm
