// Double reference of the token embedding: out(BT,C) = wte[tokens].
#pragma once

namespace ref {

inline void embedding_forward(double* out, const int* tokens, const double* wte, int BT, int C) {
    for (int i = 0; i < BT; i++)
        for (int c = 0; c < C; c++) out[(size_t)i * C + c] = wte[(size_t)tokens[i] * C + c];
}

// dwte[token] += dout row, for every position
inline void embedding_backward(double* dwte, const double* dout, const int* tokens, int BT, int C) {
    for (int i = 0; i < BT; i++)
        for (int c = 0; c < C; c++) dwte[(size_t)tokens[i] * C + c] += dout[(size_t)i * C + c];
}

} // namespace ref
