// ZeRO sharding (no CUDA): how the flat parameter buffer is cut into one contiguous range per
// rank. Every tensor, and so every Muon matrix, is owned whole by one rank.
#pragma once
#include <cstddef>
#include <vector>

// ZeRO-1: cuts [0, total) at the given tensor boundaries into `world` contiguous ranges of about
// total / world elements: rank r owns [bounds[r], bounds[r + 1]).
inline std::vector<size_t> partition_ranges(const std::vector<size_t>& tensor_ends, size_t total, int world) {
    std::vector<size_t> bounds(1, 0);
    for (int r = 1; r < world; r++) {
        const size_t target = total * r / world;
        size_t cut = bounds.back();
        for (size_t e : tensor_ends) {  // the boundary closest to the target, not before the last cut
            if (e < bounds.back()) continue;
            if (e > total) break;
            if (cut == bounds.back() || (e > target ? e - target : target - e) < (cut > target ? cut - target : target - cut))
                cut = e;
        }
        bounds.push_back(cut);
    }
    bounds.push_back(total);
    return bounds;
}

// the ranks' ranges of a parameter buffer, cut at its tensors' ends
template <typename Table>
inline std::vector<size_t> param_ranges(const Table& P, int world) {
    std::vector<size_t> ends;
    for (auto& t : P.tensors) ends.push_back(t.offset + t.count);
    return partition_ranges(ends, P.total, world);
}
