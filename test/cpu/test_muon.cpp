// Muon's double reference (test/ref/muon.h) against the PyTorch dump (test/muon_ref.py):
// the Newton-Schulz output is near-orthogonal and equal to PyTorch's, and two steps with
// global-norm clipping give PyTorch's parameters and momentum.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <vector>
#include "test/ref/muon.h"
#include "test/tensor_file.h"
#include "test/test_util.h"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

// eigenvalues of a symmetric n x n matrix (cyclic Jacobi rotations)
static std::vector<double> sym_eigenvalues(std::vector<double> a, int n) {
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0, diag = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) (i == j ? diag : off) += a[(size_t)i * n + j] * a[(size_t)i * n + j];
        if (off <= 1e-26 * diag) break;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) {
                const double apq = a[(size_t)p * n + q];
                if (std::fabs(apq) < 1e-300) continue;
                const double app = a[(size_t)p * n + p], aqq = a[(size_t)q * n + q];
                const double theta = (aqq - app) / (2 * apq);
                const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
                const double c = 1 / std::sqrt(t * t + 1), s = t * c;
                for (int k = 0; k < n; k++) {  // rotate columns p, q
                    const double akp = a[(size_t)k * n + p], akq = a[(size_t)k * n + q];
                    a[(size_t)k * n + p] = c * akp - s * akq;
                    a[(size_t)k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) {  // rotate rows p, q
                    const double apk = a[(size_t)p * n + k], aqk = a[(size_t)q * n + k];
                    a[(size_t)p * n + k] = c * apk - s * aqk;
                    a[(size_t)q * n + k] = s * apk + c * aqk;
                }
            }
    }
    std::vector<double> ev(n);
    for (int i = 0; i < n; i++) ev[i] = a[(size_t)i * n + i];
    return ev;
}

// singular values of a row-major (rows, cols) matrix, from O O^T or O^T O (the small side)
static std::vector<double> singular_values(const double* o, int rows, int cols) {
    const bool tr = rows > cols;
    const int m = tr ? cols : rows, n = tr ? rows : cols;
    auto at = [&](int i, int k) { return tr ? o[(size_t)k * cols + i] : o[(size_t)i * cols + k]; };
    std::vector<double> g((size_t)m * m);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < m; j++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += at(i, k) * at(j, k);
            g[(size_t)i * m + j] = s;
        }
    std::vector<double> ev = sym_eigenvalues(g, m);
    for (double& e : ev) e = std::sqrt(std::max(0.0, e));
    return ev;
}

TEST_CASE("muon: Jacobi singular values of a known matrix", "[muon]") {
    // diag(3, 2, 0.5) rotated on both sides by Givens rotations: singular values 3, 2, 0.5
    const double c = std::cos(0.3), s = std::sin(0.3), c2 = std::cos(1.1), s2 = std::sin(1.1);
    std::vector<double> U = {c, -s, 0, s, c, 0, 0, 0, 1}, V = {1, 0, 0, 0, c2, -s2, 0, s2, c2}, d = {3, 2, 0.5};
    std::vector<double> M(9);
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++) {
            double acc = 0;
            for (int k = 0; k < 3; k++) acc += U[i * 3 + k] * d[k] * V[j * 3 + k];
            M[i * 3 + j] = acc;
        }
    std::vector<double> sv = singular_values(M.data(), 3, 3);
    std::sort(sv.begin(), sv.end());
    CHECK(sv[0] == Approx(0.5).epsilon(1e-12));
    CHECK(sv[1] == Approx(2.0).epsilon(1e-12));
    CHECK(sv[2] == Approx(3.0).epsilon(1e-12));
}

TEST_CASE("muon: Newton-Schulz output is near-orthogonal and matches PyTorch", "[muon]") {
    TensorFile tf("test/dumps/muon_step.bin");
    const int count = (int)tf.get("muon.count").data[0];
    const int ns_steps = (int)tf.get("muon.ns_steps").data[0];
    const double momentum = tf.get("muon.momentum").data[0], clip = tf.get("muon.grad_clip").data[0];
    const bool nesterov = tf.get("muon.nesterov").data[0] != 0;
    REQUIRE(count == 3);
    // step 1's clip factor over all matrices' gradients
    double norm2 = 0;
    for (int i = 0; i < count; i++)
        for (double g : tf.get("mats." + std::to_string(i) + ".grad.1").data) norm2 += g * g;
    const double clip1 = ref::muon_clip_scale(norm2, clip);
    CHECK(clip1 < 0.1);  // this step clips
    CHECK(clip1 == Approx(tf.get("clip_scale.1").data[0]).epsilon(1e-12));
    for (int i = 0; i < count; i++) {
        const std::string pre = "mats." + std::to_string(i);
        const Tensor& g = tf.get(pre + ".grad.1");
        const int rows = (int)g.dims[0], cols = (int)g.dims[1];
        INFO(pre << " (" << rows << ", " << cols << ")");
        // on the first step buf = g, u = g + momentum g (Nesterov)
        std::vector<double> u(g.data.size()), O(g.data.size());
        for (size_t k = 0; k < u.size(); k++) u[k] = g.data[k] * clip1 * (nesterov ? 1 + momentum : 1.0);
        ref::newton_schulz5(O.data(), u.data(), rows, cols, ns_steps);
        CHECK(rel_l2(O, tf.get(pre + ".ns.1").data) < 1e-9);
        std::vector<double> sv = singular_values(O.data(), rows, cols);
        const int m = std::min(rows, cols);
        REQUIRE((int)sv.size() == m);
        int inside = 0;
        double lo = 1e30, hi = 0;
        for (double x : sv) {
            inside += x > 0.6 && x < 1.25;
            lo = std::min(lo, x);
            hi = std::max(hi, x);
        }
        INFO("singular values in [" << lo << ", " << hi << "], " << inside << " of " << m << " in (0.6, 1.25)");
        CHECK(hi < 1.25);
        if (rows != cols) CHECK(inside == m);     // a rectangular Gaussian's spectrum converges entirely
        else CHECK(inside >= 0.95 * m);           // a square one has a few tiny singular values that lag
        // not the identity map: the input's singular values spread over a wide range
        std::vector<double> svu = singular_values(u.data(), rows, cols);
        CHECK(*std::max_element(svu.begin(), svu.end()) > 3 * *std::min_element(svu.begin(), svu.end()));
    }
}

TEST_CASE("muon: two steps with clipping match PyTorch's parameters and momentum", "[muon]") {
    TensorFile tf("test/dumps/muon_step.bin");
    const int count = (int)tf.get("muon.count").data[0];
    const int ns_steps = (int)tf.get("muon.ns_steps").data[0];
    const double lr = tf.get("muon.lr").data[0], momentum = tf.get("muon.momentum").data[0];
    const double wd = tf.get("muon.weight_decay").data[0], clip = tf.get("muon.grad_clip").data[0];
    const bool nesterov = tf.get("muon.nesterov").data[0] != 0;
    std::vector<std::vector<double>> p(count), buf(count);
    for (int i = 0; i < count; i++) {
        p[i] = tf.get("mats." + std::to_string(i) + ".param").data;
        buf[i].assign(p[i].size(), 0.0);
    }
    for (int step = 1; step <= 2; step++) {
        const std::string st = std::to_string(step);
        double norm2 = 0;
        for (int i = 0; i < count; i++)
            for (double g : tf.get("mats." + std::to_string(i) + ".grad." + st).data) norm2 += g * g;
        const double cs = ref::muon_clip_scale(norm2, clip);
        CHECK(cs == Approx(tf.get("clip_scale." + st).data[0]).epsilon(1e-12));
        for (int i = 0; i < count; i++) {
            const std::string pre = "mats." + std::to_string(i);
            const Tensor& gt = tf.get(pre + ".grad." + st);
            const int rows = (int)gt.dims[0], cols = (int)gt.dims[1];
            std::vector<double> g(gt.data), before(p[i]);
            for (double& x : g) x *= cs;
            ref::muon_step(p[i].data(), buf[i].data(), g.data(), rows, cols, lr, momentum, nesterov, ns_steps, wd);
            INFO(pre << " step " << step);
            const std::vector<double>& want = tf.get(pre + ".after." + st).data;
            CHECK(rel_l2(p[i], want) < 1e-12);
            // the step itself (not only the parameters, which it barely moves) matches
            std::vector<double> d(p[i].size()), dw(p[i].size());
            for (size_t k = 0; k < d.size(); k++) { d[k] = p[i][k] - before[k]; dw[k] = want[k] - before[k]; }
            CHECK(rel_l2(d, dw) < 1e-9);
        }
    }
    for (int i = 0; i < count; i++) CHECK(rel_l2(buf[i], tf.get("mats." + std::to_string(i) + ".momentum.2").data) < 1e-12);
}

}  // namespace
