// Double reference of fused_classifier (loss.cuh). Per row i, weight w_i (1 if weights is
// null; 0 if targets[i] < 0):
//   lse = logsumexp(logits[i,:]), ce = lse - logits[i, t_i], losses[i] = w_i (ce + z_loss lse^2)
//   dlogits[i,j] = dloss w_i (softmax_j (1 + 2 z_loss lse) - [j == t_i])
#pragma once
#include <cmath>

namespace ref {

// logits (BT, V) unpadded; dlogits may be nullptr
inline void cross_entropy(double* losses, double* dlogits, const double* logits, const int* targets,
                          const double* weights, double dloss, double z_loss, int BT, int V) {
    for (int i = 0; i < BT; i++) {
        const double* row = logits + (size_t)i * V;
        int t = targets[i];
        double w = t < 0 ? 0.0 : (weights ? weights[i] : 1.0);
        double mx = row[0];
        for (int j = 1; j < V; j++) mx = std::fmax(mx, row[j]);
        double sum = 0.0;
        for (int j = 0; j < V; j++) sum += std::exp(row[j] - mx);
        double lse = mx + std::log(sum);
        losses[i] = t < 0 ? 0.0 : w * (lse - row[t] + z_loss * lse * lse);
        if (!dlogits) continue;
        for (int j = 0; j < V; j++) {
            double sm = std::exp(row[j] - lse);
            dlogits[(size_t)i * V + j] = dloss * w * (sm * (1.0 + 2.0 * z_loss * lse) - (j == t ? 1.0 : 0.0));
        }
    }
}

} // namespace ref
