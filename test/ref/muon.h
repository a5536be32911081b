// Double reference of one Muon step on one matrix (optim.cuh): momentum, Newton-Schulz
// orthogonalisation (in double), the RMS-matching scale and decoupled weight decay.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

namespace ref {

constexpr double MUON_A = 3.4445, MUON_B = -4.7750, MUON_C = 2.0315;

// min(1, clip / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_; 1 when clip <= 0
inline double muon_clip_scale(double norm2, double clip) {
    return clip > 0 ? std::min(1.0, clip / (std::sqrt(norm2) + 1e-6)) : 1.0;
}

// out (rows, cols) = NewtonSchulz5(g): X = g / (||g||_F + 1e-7), on the transpose when
// rows > cols (so A = X X^T is the small side); `steps` times A = X X^T, B = b A + c A A,
// X = a X + B X; transposed back. out may not alias g.
inline void newton_schulz5(double* out, const double* g, int rows, int cols, int steps) {
    const bool tr = rows > cols;
    const int m = tr ? cols : rows, n = tr ? rows : cols;  // X is (m, n), m <= n
    double norm = 0;
    for (size_t i = 0; i < (size_t)rows * cols; i++) norm += g[i] * g[i];
    norm = std::sqrt(norm) + 1e-7;
    std::vector<double> X((size_t)m * n), A((size_t)m * m), B((size_t)m * m), Y((size_t)m * n);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            double v = g[(size_t)r * cols + c] / norm;
            if (tr) X[(size_t)c * n + r] = v;
            else X[(size_t)r * n + c] = v;
        }
    for (int it = 0; it < steps; it++) {
        for (int i = 0; i < m; i++)
            for (int j = 0; j < m; j++) {
                double s = 0;
                for (int k = 0; k < n; k++) s += X[(size_t)i * n + k] * X[(size_t)j * n + k];
                A[(size_t)i * m + j] = s;
            }
        for (int i = 0; i < m; i++)
            for (int j = 0; j < m; j++) {
                double s = 0;
                for (int k = 0; k < m; k++) s += A[(size_t)i * m + k] * A[(size_t)k * m + j];
                B[(size_t)i * m + j] = MUON_B * A[(size_t)i * m + j] + MUON_C * s;
            }
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) {
                double s = 0;
                for (int k = 0; k < m; k++) s += B[(size_t)i * m + k] * X[(size_t)k * n + j];
                Y[(size_t)i * n + j] = MUON_A * X[(size_t)i * n + j] + s;
            }
        X.swap(Y);
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) out[(size_t)r * cols + c] = tr ? X[(size_t)c * n + r] : X[(size_t)r * n + c];
}

// RMS match to AdamW (Moonlight): the update is 0.2 sqrt(max(rows, cols)) * NS output
inline double muon_update_scale(int rows, int cols) { return 0.2 * std::sqrt((double)std::max(rows, cols)); }

// One Muon step on one row-major (rows, cols) matrix p with momentum buf; g already clipped.
// ns_out (optional) receives the Newton-Schulz output.
inline void muon_step(double* p, double* buf, const double* g, int rows, int cols, double lr, double momentum,
                      bool nesterov, int ns_steps, double wd, double* ns_out = nullptr) {
    const size_t n = (size_t)rows * cols;
    std::vector<double> u(n), O(n);
    for (size_t i = 0; i < n; i++) {
        buf[i] = momentum * buf[i] + g[i];
        u[i] = nesterov ? g[i] + momentum * buf[i] : buf[i];
    }
    newton_schulz5(O.data(), u.data(), rows, cols, ns_steps);
    const double scale = muon_update_scale(rows, cols);
    for (size_t i = 0; i < n; i++) p[i] = p[i] * (1.0 - lr * wd) - lr * scale * O[i];
    if (ns_out) std::copy(O.begin(), O.end(), ns_out);
}

} // namespace ref
