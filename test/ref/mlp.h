// Double reference of the MLP activations (mlp.cuh): a is the up projection's output,
// (rows, 2 ff) = [gate | up] for swiglu, (rows, ff) otherwise; act is (rows, ff).
#pragma once
#include <cmath>
#include <string>
#include "norm.h"  // silu, silu_grad

namespace ref {

inline void mlp_act_forward(double* act, const double* a, int rows, int ff, const std::string& kind) {
    const int w = kind == "swiglu" ? 2 * ff : ff;
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < ff; j++) {
            const double x = a[(size_t)r * w + j];
            double y;
            if (kind == "swiglu") y = silu(x) * a[(size_t)r * w + ff + j];
            else if (kind == "gelu") y = 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
            else y = x > 0 ? x * x : 0.0;
            act[(size_t)r * ff + j] = y;
        }
    }
}

// da (layout of a) = dact * d act / d a
inline void mlp_act_backward(double* da, const double* dact, const double* a, int rows, int ff, const std::string& kind) {
    const int w = kind == "swiglu" ? 2 * ff : ff;
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < ff; j++) {
            const double x = a[(size_t)r * w + j], d = dact[(size_t)r * ff + j];
            if (kind == "swiglu") {
                const double u = a[(size_t)r * w + ff + j];
                da[(size_t)r * w + j] = d * u * silu_grad(x);
                da[(size_t)r * w + ff + j] = d * silu(x);
            } else if (kind == "gelu") {
                const double cdf = 0.5 * (1.0 + std::erf(x / std::sqrt(2.0)));
                const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
                da[(size_t)r * w + j] = d * (cdf + x * pdf);
            } else {
                da[(size_t)r * w + j] = d * (x > 0 ? 2.0 * x : 0.0);
            }
        }
    }
}

} // namespace ref
