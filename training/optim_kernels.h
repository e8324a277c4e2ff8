// CPU kernel of training/optim.py: one Adam / AdamW step fused with the EMA of the weights, over
// a chunk of parameter tensors in one Jittor op (C++ with OpenMP, compiled by Jittor with
// -Ofast -fopenmp -march=native). The op opens one OpenMP team and calls ``adam_ema`` once per
// tensor inside it, so the threads start once per chunk rather than once per tensor and op.
#pragma once
#include <cmath>
#include <omp.h>

namespace iidm_optim {

// Coefficients of one step, the same for every tensor of the op.
struct AdamCoefficients {
    float b0, b1;          // betas
    float decay_factor;    // AdamW: 1 - lr * weight_decay (decoupled); Adam: 1
    float l2;              // Adam: weight_decay added to the gradient as l2 * p; AdamW: 0
    float step_size;       // AdamW: lr / (1 - b0^n); Adam: lr * sqrt(1 - b1^n) / (1 - b0^n)
    float sqrt_bc2;        // AdamW: sqrt(1 - b1^n); Adam: 1 (eps outside the correction)
    float eps;
    float ema_decay;       // used when e != nullptr
};

// One tensor of n elements: p, g, m, v, e in; p_out, m_out, v_out, e_out out (e, e_out may be
// null). Called from inside an OpenMP parallel region (orphaned ``omp for``).
//   AdamW:  p' = p (1 - lr wd);  m' = b0 m + (1 - b0) g;  v' = b1 v + (1 - b1) g^2
//           p'' = p' - lr / (1 - b0^n) * m' / (sqrt(v') / sqrt(1 - b1^n) + eps)
//   Adam:   g' = g + wd p, then the same moments; p'' = p - lr sqrt(1-b1^n)/(1-b0^n) m'/(sqrt(v')+eps)
//   EMA:    e' = d e + (1 - d) p''
static inline void adam_ema(long n, const float* p, const float* g, const float* m, const float* v,
                            const float* e, float* p_out, float* m_out, float* v_out, float* e_out,
                            const AdamCoefficients& c) {
    const float one_b0 = 1.0f - c.b0, one_b1 = 1.0f - c.b1, one_d = 1.0f - c.ema_decay;
    if (e != nullptr) {
        #pragma omp for simd schedule(static) nowait
        for (long i = 0; i < n; i++) {
            const float gi = g[i] + c.l2 * p[i];
            const float mi = c.b0 * m[i] + one_b0 * gi;
            const float vi = c.b1 * v[i] + one_b1 * gi * gi;
            const float pi = p[i] * c.decay_factor - c.step_size * mi / (std::sqrt(vi) / c.sqrt_bc2 + c.eps);
            m_out[i] = mi; v_out[i] = vi; p_out[i] = pi;
            e_out[i] = c.ema_decay * e[i] + one_d * pi;
        }
    } else {
        #pragma omp for simd schedule(static) nowait
        for (long i = 0; i < n; i++) {
            const float gi = g[i] + c.l2 * p[i];
            const float mi = c.b0 * m[i] + one_b0 * gi;
            const float vi = c.b1 * v[i] + one_b1 * gi * gi;
            m_out[i] = mi; v_out[i] = vi;
            p_out[i] = p[i] * c.decay_factor - c.step_size * mi / (std::sqrt(vi) / c.sqrt_bc2 + c.eps);
        }
    }
}

}  // namespace iidm_optim
