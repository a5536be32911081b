// The C++ double reference (test/ref/*.h) against the float64 PyTorch dumps
// (test/pytorch_ref.py, `make dumps`): logits, loss, every gradient and 10 AdamW step
// losses. Plus finite-difference checks of the hand-written backwards, so the references
// are proven independently of PyTorch too.
#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include "test/ref/model.h"
#include "test/tensor_file.h"
#include "test/test_util.h"

namespace {  // file-local: all test files link into one binary (same-named helper types would clash)

// rel_l2 of same-sized vectors, never against zeros
static double rel_err(const std::vector<double>& a, const std::vector<double>& ref) {
    REQUIRE(a.size() == ref.size());
    REQUIRE(std::any_of(ref.begin(), ref.end(), [](double v) { return v != 0; }));
    return rel_l2(a, ref);
}

static void check_reference_against_dump(const std::string& name) {
    const double tol = 1e-9;  // double vs double: only summation order differs
    ref::ModelConfig cfg = ref::ModelConfig::from_json("test/dumps/" + name + ".json");
    TensorFile tf("test/dumps/" + name + ".bin");
    const auto& in = tf.get("inputs");
    REQUIRE(in.dims.size() == 2);
    const int B = (int)in.dims[0], T = (int)in.dims[1];
    std::vector<int> inputs, targets;
    for (double x : in.data) inputs.push_back((int)x);
    for (double x : tf.get("targets").data) targets.push_back((int)x);
    const std::vector<double>& weights = tf.get("loss_weights").data;
    const double z_loss = tf.get("z_loss").data[0];

    ref::Model model(cfg);
    for (auto& n : model.names) {
        const auto& d = tf.get(n).data;
        REQUIRE(d.size() == model.params[n].size());
        model.params[n] = d;
    }
    // every parameter in the dump belongs to the model (no tensor silently unchecked)
    size_t dumped_params = 0;
    for (auto& kv : tf.tensors) dumped_params += kv.first.rfind("grad.", 0) == 0;
    CHECK(dumped_params == model.names.size());

    double loss = model.forward(inputs, targets, weights, B, T, z_loss);
    double e_logits = rel_err(model.logits(), tf.get("logits").data);
    INFO(name << ": logits rel err " << e_logits);
    CHECK(e_logits < tol);
    double ref_loss = tf.get("loss").data[0];
    INFO(name << ": loss " << loss << " vs " << ref_loss);
    CHECK(std::fabs(loss - ref_loss) / std::fabs(ref_loss) < tol);

    for (auto& kv : model.grads) std::fill(kv.second.begin(), kv.second.end(), NAN);  // poison
    model.backward();
    for (auto& n : model.names) {
        double e = rel_err(model.grads[n], tf.get("grad." + n).data);
        INFO(name << ": grad." << n << " rel err " << e);
        CHECK(e < tol);
    }

    auto s = [&](const char* k) { return tf.get(std::string("adamw.") + k).data[0]; };
    const auto& ref_losses = tf.get("step_losses").data;
    std::vector<double> losses = model.adamw_train((int)ref_losses.size(), inputs, targets, weights, B, T, z_loss,
                                                   s("lr"), s("beta1"), s("beta2"), s("eps"), s("weight_decay"),
                                                   s("grad_clip"));
    REQUIRE(losses.size() == 10);
    for (size_t i = 0; i < losses.size(); i++) {
        INFO(name << ": AdamW step " << i << " loss " << losses[i] << " vs " << ref_losses[i]);
        CHECK(std::fabs(losses[i] - ref_losses[i]) / std::fabs(ref_losses[i]) < tol);
    }
    CHECK(losses.back() < losses.front() - 0.5);  // it trains
}

TEST_CASE("reference: mamba2_tiny matches PyTorch (untied, z-loss, weights, masks)", "[reference]") {
    check_reference_against_dump("mamba2_tiny");
}

TEST_CASE("reference: mamba2_tied matches PyTorch (tied embeddings)", "[reference]") {
    check_reference_against_dump("mamba2_tied");
}

TEST_CASE("reference: mamba1_tiny matches PyTorch (Mamba-1 blocks, z-loss, weights, masks)", "[reference]") {
    check_reference_against_dump("mamba1_tiny");
}

TEST_CASE("reference: hybrid_tiny matches PyTorch (Mamba-2, GQA attention, GELU MLP)", "[reference]") {
    check_reference_against_dump("hybrid_tiny");
}

TEST_CASE("reference: transformer_tiny matches PyTorch (GQA 4:1 with RoPE, SwiGLU, tied)", "[reference]") {
    check_reference_against_dump("transformer_tiny");
}

TEST_CASE("reference: dump reader rejects a missing name and a bad file", "[reference]") {
    TensorFile tf("test/dumps/mamba2_tied.bin");
    CHECK_THROWS(tf.get("no_such_tensor"));
    CHECK_THROWS(TensorFile("test/dumps/no_such_file.bin"));
    CHECK_THROWS(TensorFile("test/dumps/mamba2_tied.json"));  // bad magic
    // truncated
    FILE* src = fopen("test/dumps/mamba2_tied.bin", "rb");
    REQUIRE(src);
    std::vector<char> buf(1000);
    REQUIRE(fread(buf.data(), 1, buf.size(), src) == buf.size());
    fclose(src);
    FILE* dst = fopen("/tmp/mamba_test_truncated.bin", "wb");
    REQUIRE(dst);
    fwrite(buf.data(), 1, buf.size(), dst);
    fclose(dst);
    CHECK_THROWS(TensorFile("/tmp/mamba_test_truncated.bin"));
}

// ----------------------------------------------------------------------------
// finite differences: d(sum R * f(inputs)) / d input, central, against the backward

static std::vector<double> random_vec(std::mt19937& rng, size_t n, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    std::vector<double> v(n);
    for (auto& x : v) x = u(rng);
    return v;
}

// numeric gradient of loss() w.r.t. every element of v (perturbed in place and restored)
static std::vector<double> numeric_grad(std::vector<double>& v, const std::function<double()>& loss) {
    const double h = 1e-5;
    std::vector<double> g(v.size());
    for (size_t i = 0; i < v.size(); i++) {
        double old = v[i];
        v[i] = old + h;
        double lp = loss();
        v[i] = old - h;
        double lm = loss();
        v[i] = old;
        g[i] = (lp - lm) / (2 * h);
    }
    return g;
}

static double dot(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}

TEST_CASE("reference: ssd_backward matches finite differences", "[reference]") {
    const int B = 2, T = 7, H = 4, P = 3, G = 2, N = 5;
    std::mt19937 rng(7);
    auto x = random_vec(rng, (size_t)B * T * H * P, -1, 1), Bm = random_vec(rng, (size_t)B * T * G * N, -1, 1),
         Cm = random_vec(rng, (size_t)B * T * G * N, -1, 1), dt_raw = random_vec(rng, (size_t)B * T * H, -2, 1),
         dt_bias = random_vec(rng, H, -1, 0.5), A_log = random_vec(rng, H, 0, 1.5), D = random_vec(rng, H, 0.5, 1.5),
         R = random_vec(rng, x.size(), -1, 1);
    std::vector<double> y(x.size());
    auto loss = [&] {
        ref::ssd_forward(y.data(), x.data(), Bm.data(), Cm.data(), dt_raw.data(), dt_bias.data(), A_log.data(),
                         D.data(), B, T, H, P, G, N);
        return dot(y, R);
    };
    std::vector<double> dx(x.size(), NAN), dB(Bm.size(), NAN), dC(Cm.size(), NAN), ddt(dt_raw.size(), NAN),
        dbias(H, 0.0), dalog(H, 0.0), dD(H, 0.0);
    ref::ssd_backward(dx.data(), dB.data(), dC.data(), ddt.data(), dbias.data(), dalog.data(), dD.data(), R.data(),
                      x.data(), Bm.data(), Cm.data(), dt_raw.data(), dt_bias.data(), A_log.data(), D.data(),
                      B, T, H, P, G, N);
    const double tol = 1e-6;
    CHECK(rel_err(dx, numeric_grad(x, loss)) < tol);
    CHECK(rel_err(dB, numeric_grad(Bm, loss)) < tol);
    CHECK(rel_err(dC, numeric_grad(Cm, loss)) < tol);
    CHECK(rel_err(ddt, numeric_grad(dt_raw, loss)) < tol);
    CHECK(rel_err(dbias, numeric_grad(dt_bias, loss)) < tol);
    CHECK(rel_err(dalog, numeric_grad(A_log, loss)) < tol);
    CHECK(rel_err(dD, numeric_grad(D, loss)) < tol);
}

TEST_CASE("reference: gated_rmsnorm_backward matches finite differences", "[reference]") {
    const int rows = 5, C = 12, groups = 3;
    const double eps = 1e-5;
    std::mt19937 rng(11);
    auto y = random_vec(rng, rows * C, -2, 2), z = random_vec(rng, rows * C, -3, 3),
         w = random_vec(rng, C, 0.5, 1.5), R = random_vec(rng, rows * C, -1, 1);
    std::vector<double> out(rows * C), rstd(rows * groups);
    auto loss = [&] {
        ref::gated_rmsnorm_forward(out.data(), rstd.data(), y.data(), z.data(), w.data(), rows, C, groups, eps);
        return dot(out, R);
    };
    loss();
    std::vector<double> dy(y.size(), NAN), dz(z.size(), NAN), dw(C, 0.0);
    ref::gated_rmsnorm_backward(dy.data(), dz.data(), dw.data(), R.data(), y.data(), z.data(), w.data(),
                                rstd.data(), rows, C, groups);
    const double tol = 1e-6;
    CHECK(rel_err(dy, numeric_grad(y, loss)) < tol);
    CHECK(rel_err(dz, numeric_grad(z, loss)) < tol);
    CHECK(rel_err(dw, numeric_grad(w, loss)) < tol);
}

TEST_CASE("reference: conv1d_silu and cross_entropy backwards match finite differences", "[reference]") {
    std::mt19937 rng(13);
    const double tol = 1e-6;
    {
        const int B = 2, T = 6, C = 3, K = 4;
        auto in = random_vec(rng, B * T * C, -1, 1), w = random_vec(rng, C * K, -0.5, 0.5),
             b = random_vec(rng, C, -0.5, 0.5), R = random_vec(rng, B * T * C, -1, 1);
        std::vector<double> out(in.size());
        auto loss = [&] {
            ref::conv1d_silu_forward(out.data(), in.data(), w.data(), b.data(), B, T, C, K);
            return dot(out, R);
        };
        std::vector<double> din(in.size(), NAN), dw(w.size(), 0.0), db(C, 0.0);
        ref::conv1d_silu_backward(din.data(), dw.data(), db.data(), R.data(), in.data(), w.data(), b.data(), B, T,
                                  C, K);
        CHECK(rel_err(din, numeric_grad(in, loss)) < tol);
        CHECK(rel_err(dw, numeric_grad(w, loss)) < tol);
        CHECK(rel_err(db, numeric_grad(b, loss)) < tol);
    }
    {
        const int BT = 4, V = 9;
        const double dloss = 0.7, z_loss = 0.05;
        auto logits = random_vec(rng, BT * V, -3, 3), weights = random_vec(rng, BT, 0.2, 1.0);
        std::vector<int> targets = {3, -1, 0, 8};
        std::vector<double> losses(BT);
        auto loss = [&] {
            ref::cross_entropy(losses.data(), nullptr, logits.data(), targets.data(), weights.data(), dloss, z_loss,
                               BT, V);
            double s = 0;
            for (double l : losses) s += l;
            return dloss * s;
        };
        std::vector<double> dlogits(logits.size(), NAN);
        ref::cross_entropy(losses.data(), dlogits.data(), logits.data(), targets.data(), weights.data(), dloss,
                           z_loss, BT, V);
        CHECK(losses[1] == 0.0);  // masked target
        CHECK(rel_err(dlogits, numeric_grad(logits, loss)) < tol);
    }
}

TEST_CASE("reference: MLP activation backwards match finite differences", "[reference]") {
    std::mt19937 rng(17);
    const int rows = 3, ff = 5;
    for (const char* kind : {"swiglu", "gelu", "relu2"}) {
        const int w = std::string(kind) == "swiglu" ? 2 * ff : ff;
        auto a = random_vec(rng, rows * w, -2, 2), R = random_vec(rng, rows * ff, -1, 1);
        std::vector<double> act(rows * ff);
        auto loss = [&] {
            ref::mlp_act_forward(act.data(), a.data(), rows, ff, kind);
            return dot(act, R);
        };
        std::vector<double> da(a.size(), NAN);
        ref::mlp_act_backward(da.data(), R.data(), a.data(), rows, ff, kind);
        INFO(kind);
        CHECK(rel_err(da, numeric_grad(a, loss)) < 1e-6);
    }
}

}  // namespace
