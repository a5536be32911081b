// Small helpers shared by the test files.
#pragma once
#include <cmath>
#include <cstdio>
#include <string>
#include <sys/wait.h>
#include <vector>

// ||got - ref|| / ||ref||; infinite if got holds a NaN or an infinity
inline double rel_l2(const std::vector<double>& got, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) return INFINITY;
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / den);
}

// runs a shell command from the repo root; returns its exit status, its output in `out`
inline int run_cmd(const std::string& cmd, std::string& out) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) return -1;
    char buf[4096];
    out.clear();
    while (fgets(buf, sizeof(buf), p)) out += buf;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
