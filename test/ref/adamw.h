// Double reference of one torch.optim.AdamW step (decoupled weight decay, bias correction).
#pragma once
#include <cmath>
#include <cstddef>

namespace ref {

// grads already clipped; wd = 0 for no-decay tensors; step is 1-based
inline void adamw_step(double* p, double* m, double* v, const double* g, size_t n, double lr, double beta1,
                       double beta2, double eps, double wd, int step) {
    double bc1 = 1.0 - std::pow(beta1, step), bc2 = 1.0 - std::pow(beta2, step);
    for (size_t i = 0; i < n; i++) {
        p[i] *= 1.0 - lr * wd;
        m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
        v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
        p[i] -= lr / bc1 * m[i] / (std::sqrt(v[i]) / std::sqrt(bc2) + eps);
    }
}

} // namespace ref
