// Double reference of causal grouped-query attention and of rotary position embedding.
// Layouts: q (B,T,Hq,Dh), k and v (B,T,Hkv,Dh), out (B,T,Hq,Dh), lse (B,Hq,T); query head h reads
// kv head h / (Hq/Hkv). Per sequence b and query head h, with scale = 1/sqrt(Dh):
//   S_ts = scale q_t . k_s  (s <= t),  lse_t = log sum_s exp(S_ts),  P_ts = exp(S_ts - lse_t),  out_t = sum_s P_ts v_s
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

namespace ref {

struct AttnIndex {
    int B, T, Hq, Hkv, Dh;
    size_t q(int b, int t, int h) const { return (((size_t)b * T + t) * Hq + h) * Dh; }
    size_t kv(int b, int t, int h) const { return (((size_t)b * T + t) * Hkv + h) * Dh; }
};

// row t of P for (b, h) into p[0..t]; returns lse_t
inline double attention_row(double* p, const double* q, const double* k, const AttnIndex& ix, int b, int h, int t) {
    const int kvh = h / (ix.Hq / ix.Hkv);
    const double scale = 1.0 / std::sqrt((double)ix.Dh);
    double mx = -INFINITY;
    for (int s = 0; s <= t; s++) {
        double dot = 0.0;
        for (int d = 0; d < ix.Dh; d++) dot += q[ix.q(b, t, h) + d] * k[ix.kv(b, s, kvh) + d];
        p[s] = dot * scale;
        mx = std::max(mx, p[s]);
    }
    double sum = 0.0;
    for (int s = 0; s <= t; s++) sum += std::exp(p[s] - mx);
    const double lse = mx + std::log(sum);
    for (int s = 0; s <= t; s++) p[s] = std::exp(p[s] - lse);
    return lse;
}

inline void attention_forward(double* out, double* lse, const double* q, const double* k, const double* v,
                              int B, int T, int Hq, int Hkv, int Dh) {
    AttnIndex ix{B, T, Hq, Hkv, Dh};
    std::vector<double> p(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hq; h++) {
            const int kvh = h / (Hq / Hkv);
            for (int t = 0; t < T; t++) {
                lse[((size_t)b * Hq + h) * T + t] = attention_row(p.data(), q, k, ix, b, h, t);
                for (int d = 0; d < Dh; d++) {
                    double acc = 0.0;
                    for (int s = 0; s <= t; s++) acc += p[s] * v[ix.kv(b, s, kvh) + d];
                    out[ix.q(b, t, h) + d] = acc;
                }
            }
        }
}

// dq, dk, dv written. dP_ts = dout_t . v_s, dS_ts = P_ts (dP_ts - sum_s' P_ts' dP_ts'),
// dq_t = scale sum_s dS_ts k_s, dk_s = scale sum_t dS_ts q_t, dv_s = sum_t P_ts dout_t (summed over the group's heads)
inline void attention_backward(double* dq, double* dk, double* dv, const double* dout, const double* q,
                               const double* k, const double* v, int B, int T, int Hq, int Hkv, int Dh) {
    AttnIndex ix{B, T, Hq, Hkv, Dh};
    const double scale = 1.0 / std::sqrt((double)Dh);
    std::fill(dq, dq + (size_t)B * T * Hq * Dh, 0.0);
    std::fill(dk, dk + (size_t)B * T * Hkv * Dh, 0.0);
    std::fill(dv, dv + (size_t)B * T * Hkv * Dh, 0.0);
    std::vector<double> p(T), dp(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hq; h++) {
            const int kvh = h / (Hq / Hkv);
            for (int t = 0; t < T; t++) {
                attention_row(p.data(), q, k, ix, b, h, t);
                double delta = 0.0;
                for (int s = 0; s <= t; s++) {
                    double acc = 0.0;
                    for (int d = 0; d < Dh; d++) acc += dout[ix.q(b, t, h) + d] * v[ix.kv(b, s, kvh) + d];
                    dp[s] = acc;
                    delta += p[s] * acc;
                }
                for (int s = 0; s <= t; s++) {
                    const double ds = p[s] * (dp[s] - delta);
                    for (int d = 0; d < Dh; d++) {
                        dq[ix.q(b, t, h) + d] += scale * ds * k[ix.kv(b, s, kvh) + d];
                        dk[ix.kv(b, s, kvh) + d] += scale * ds * q[ix.q(b, t, h) + d];
                        dv[ix.kv(b, s, kvh) + d] += p[s] * dout[ix.q(b, t, h) + d];
                    }
                }
            }
        }
}

// RoPE (rotate-half, GPT-NeoX) in place on x (B,T,H,Dh): for i < Dh/2, angle = t * theta^(-2i/Dh),
//   (x_i, x_{i+Dh/2}) <- (x_i cos - x_{i+Dh/2} sin, x_{i+Dh/2} cos + x_i sin)
// The backward applies the transposed rotation (angle negated) to the gradient.
inline void rope_rotate(double* x, int B, int T, int H, int Dh, double theta, double sign) {
    const int half = Dh / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                double* r = x + (((size_t)b * T + t) * H + h) * Dh;
                for (int i = 0; i < half; i++) {
                    const double ang = t * std::pow(theta, -2.0 * i / Dh);
                    const double c = std::cos(ang), s = sign * std::sin(ang);
                    const double x1 = r[i], x2 = r[i + half];
                    r[i] = x1 * c - x2 * s;
                    r[i + half] = x2 * c + x1 * s;
                }
            }
}
inline void rope_forward(double* x, int B, int T, int H, int Dh, double theta) { rope_rotate(x, B, T, H, Dh, theta, 1.0); }
inline void rope_backward(double* dx, int B, int T, int H, int Dh, double theta) {
    rope_rotate(dx, B, T, H, Dh, theta, -1.0);
}

}  // namespace ref
