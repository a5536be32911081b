// The benchmarks' anchor lookup (dev/anchors.h): a benchmark reads the figure the anchor scripts logged in the
// same device call, by the line's prefix and the label before the number.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include "dev/anchors.h"

namespace {  // file-local: all test files link into one binary

const char* const kLog = "/tmp/mamba_test_anchors.log";

// ANCHOR_LOG pointed at a log of these lines for the scope's life
struct AnchorLog {
    explicit AnchorLog(const std::string& text) {
        std::ofstream(kLog) << text;
        setenv("ANCHOR_LOG", kLog, 1);
    }
    ~AnchorLog() {
        unsetenv("ANCHOR_LOG");
        std::remove(kLog);
    }
};

}  // namespace

TEST_CASE("anchor_value: the first line of the prefix, the number after the label", "[bench]") {
    AnchorLog log("[A] mamba_chunk_scan_combined bench: B4 T4096 H64 P64 N128 G1 chunk=256\n"
                  "anchor ssd-docs B4 T4096 H64 P64 N128 G1: fwd 0.581 ms | fwd+bwd 3.218 ms\n"
                  "anchor ssd B4 T4096 H64 P64 N128 G1: fwd 0.557 ms | fwd+bwd 3.229 ms\n"
                  "anchor ssd-graph B4 T4096 H64 P64 N128 G1: fwd 0.401 ms | fwd+bwd 2.874 ms\n"
                  "anchor ssd B4 T4096 H64 P64 N128 G1: fwd 9.999 ms | fwd+bwd 9.999 ms\n");
    const std::string plain = "anchor ssd B4 T4096 H64 P64 N128 G1:";
    CHECK(anchor_value(plain, "fwd") == 0.557);  // not fwd+bwd's number, not the later line's
    CHECK(anchor_value(plain, "fwd+bwd") == 3.229);
    CHECK(anchor_value("anchor ssd-docs B4 T4096 H64 P64 N128 G1:", "fwd+bwd") == 3.218);
    CHECK(anchor_value("anchor ssd-graph B4 T4096 H64 P64 N128 G1:", "fwd") == 0.401);
    CHECK(anchor_value("anchor ssd-graph B4 T4096 H64 P64 N128 G1:", "fwd+bwd") == 2.874);
    CHECK(std::isnan(anchor_value("anchor ssd B8 T2048 H32 P64 N128 G1:", "fwd")));  // no such line
    CHECK(std::isnan(anchor_value(plain, "bwd")));                                    // no such label
}

TEST_CASE("anchor_value: NaN without a log or with a label and no number", "[bench]") {
    unsetenv("ANCHOR_LOG");
    CHECK(std::isnan(anchor_value("anchor ssd", "fwd")));
    {
        AnchorLog log("anchor scan N=16: fwd n/a ms\n");
        CHECK(std::isnan(anchor_value("anchor scan N=16:", "fwd")));
    }
    setenv("ANCHOR_LOG", "/tmp/no/such/anchors.log", 1);
    CHECK(std::isnan(anchor_value("anchor ssd", "fwd")));
    unsetenv("ANCHOR_LOG");
}
