// The metrics log of a run (no CUDA): one JSON object per line in DIR/metrics.jsonl, next to
// the checkpoints. Training steps: {"step", "tokens", "loss", "lr", "grad_norm", "ms",
// "tokens_per_s", "mfu"}; evaluations: {"step", "val_loss", "top1", "top5"}. A resumed run
// keeps the lines up to its checkpoint's step and appends after them, so a run that crashed
// after its last checkpoint leaves no duplicate steps. dev/plot_loss.py draws the curves.
#pragma once
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "common.h"

struct MetricsLog {
    std::string path;
    FILE* f = nullptr;

    MetricsLog() = default;
    MetricsLog(const MetricsLog&) = delete;
    MetricsLog& operator=(const MetricsLog&) = delete;
    ~MetricsLog() { if (f) fclose(f); }

    // a new log in dir (resume_step < 0), or the existing one cut after resume_step
    void open(const std::string& dir, int resume_step) {
        std::filesystem::create_directories(dir);
        path = dir + "/metrics.jsonl";
        std::vector<std::string> kept;
        if (resume_step >= 0 && std::filesystem::exists(path)) {
            std::ifstream in(path);
            std::string line;
            while (std::getline(in, line)) {
                nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
                if (!j.is_discarded() && j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
                    j["step"].get<long>() <= resume_step)
                    kept.push_back(line);
            }
        }
        // rewritten through a temporary file: a crash here loses no line that was kept
        std::string text;
        for (auto& l : kept) text += l + "\n";
        write_file_atomically(path, [&](FILE* t, const std::string& tmp) {
            fwrite_or_throw(text.data(), 1, text.size(), t, tmp);
        });
        f = fopen_or_throw(path, "a");
    }

    void write(const nlohmann::json& j) {
        if (!f) return;
        const std::string line = j.dump();
        if (fprintf(f, "%s\n", line.c_str()) < 0 || fflush(f) != 0)
            THROW("cannot write to '%s': %s", path.c_str(), std::strerror(errno));
    }
};
