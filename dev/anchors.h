// The anchor's figure from the same device run, for the benchmarks' ratios.
//
// The anchor scripts (dev/anchor_*.py, ../shared/anchors/*.py run from anchors/) print one
// line per measurement; a device call runs them first and points ANCHOR_LOG at their log.
// anchor_value(prefix, label) takes the first line that starts with `prefix` and returns the
// number after `label` on it ("fwd 0.563 ms": label "fwd"; the label a whole word, so "bwd" is
// not found in "fwd+bwd"), or NaN when there is no log, no such line or no such label: the
// benchmark then prints its own figure without a ratio.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

inline double anchor_value(const std::string& prefix, const std::string& label) {
    const char* path = std::getenv("ANCHOR_LOG");
    if (!path) return NAN;
    std::ifstream f(path);
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind(prefix, 0) != 0) continue;
        const size_t at = line.find(" " + label + " ", prefix.size());
        if (at == std::string::npos) return NAN;
        char* end;
        const std::string rest = line.substr(at + label.size() + 2);
        const double v = std::strtod(rest.c_str(), &end);
        return end == rest.c_str() ? NAN : v;
    }
    return NAN;
}

// "ours 0.412 ms | anchor 0.563 ms | 1.37x" (the ratio anchor / ours: above 1 means faster),
// or "ours 0.412 ms | anchor: not measured in this run"
inline void print_vs_anchor(const char* what, double ours_ms, double anchor_ms) {
    if (std::isnan(anchor_ms))
        printf("%s: ours %.3f ms | anchor: not measured in this run\n", what, ours_ms);
    else
        printf("%s: ours %.3f ms | anchor %.3f ms | %.2fx\n", what, ours_ms, anchor_ms, anchor_ms / ours_ms);
}
