// Warp-level tensor-core and asynchronous-copy helpers (inline PTX, sm_80 and later) shared by the
// tile kernels of ssd.cuh and attention.cuh: ldmatrix, mma.sync m16n8k16 (bf16 in, fp32 accumulate),
// accumulator fragments (cleared, packed as the next matmul's A operand, summed over a quad), bf16 pairs
// scaled in registers, cp.async (also conv1d.cuh's backward ring).
//
// m16n8k16 fragments (g = lane / 4, q = lane % 4):
//   A 16x16: a0 (row g, cols 2q, 2q+1), a1 (row g+8), a2 (row g, cols 2q+8, 2q+9), a3 (row g+8, cols 2q+8..)
//   B 16x8:  b0 (k 2q, 2q+1, col g), b1 (k 2q+8, 2q+9, col g)
//   C 16x8:  c0, c1 (row g, cols 2q, 2q+1), c2, c3 (row g+8)
#pragma once
#include <cstdint>
#include "cuda_common.cuh"

namespace tc {

// four 8x8 b16 matrices from smem; lane l gives the address of row l % 8 of matrix l / 8
__device__ inline void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// the same, each matrix transposed
__device__ inline void ldsm_x4_t(uint32_t (&r)[4], const bf16* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// c (16x8) += a (16x16) * b (16x8)
__device__ inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ inline uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
__device__ inline float2 unpack_bf16(uint32_t v) { return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v)); }
// a packed pair times (s0, s1), rounded once
__device__ inline uint32_t scale_bf16x2(uint32_t v, float s0, float s1) {
    const float2 f = unpack_bf16(v);
    return pack_bf16(f.x * s0, f.y * s1);
}
// an A fragment (16 x 16) with its columns scaled: k = 2q, 2q+1 by w01 and k = 2q+8, 2q+9 by w89
__device__ inline void scale_a_cols(uint32_t (&a)[4], float2 w01, float2 w89) {
    a[0] = scale_bf16x2(a[0], w01.x, w01.y);
    a[1] = scale_bf16x2(a[1], w01.x, w01.y);
    a[2] = scale_bf16x2(a[2], w89.x, w89.y);
    a[3] = scale_bf16x2(a[3], w89.x, w89.y);
}

template <int N>
__device__ inline void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}
// accumulator tiles 2kk, 2kk+1 (16 x 16 fp32) as the A fragment of the next matmul (k = their columns)
template <int N>
__device__ inline void acc_to_a(uint32_t (&a)[4], const float (&s)[N][4], int kk) {
    a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}
// a whole 16 x 8N accumulator as the N/2 k16 A fragments of the next matmul
template <int N>
__device__ inline void acc_to_a(uint32_t (&a)[N / 2][4], const float (&s)[N][4]) {
#pragma unroll
    for (int kk = 0; kk < N / 2; kk++) acc_to_a(a[kk], s, kk);
}
// sum over the 4 lanes that share an accumulator row
__device__ inline float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// asynchronous copy of BYTES (4, 8 or 16) global -> smem; ok = false writes zeros and reads nothing
// (16 bytes bypass L1, the only width that may)
template <int BYTES>
__device__ inline void cp_async_bytes(void* smem, const void* gmem, bool ok) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem), "r"(ok ? 16 : 0));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(a), "l"(gmem), "n"(BYTES), "r"(ok ? BYTES : 0));
}
// VEC bf16 from global memory, or zeros when !ok
template <int VEC>
__device__ inline Pack<bf16, VEC> load_bf16_or_zero(const bf16* gmem, bool ok) {
    Pack<bf16, VEC> pk;
    if (ok) pk = *reinterpret_cast<const Pack<bf16, VEC>*>(gmem);
    else
        #pragma unroll
        for (int e = 0; e < VEC; e++) pk.v[e] = __float2bfloat16(0.0f);
    return pk;
}
// VEC bf16 into a shared-memory slot: cp.async from 4 bytes up (zeros when !ok), below that a plain load and store
template <int VEC>
__device__ inline void cp_async_bf16(Pack<bf16, VEC>* slot, const bf16* gmem, bool ok) {
    if constexpr (VEC * sizeof(bf16) >= 4) cp_async_bytes<VEC * sizeof(bf16)>(slot, gmem, ok);
    else *slot = load_bf16_or_zero<VEC>(gmem, ok);
}
__device__ inline void cp_async16(void* smem, const void* gmem, bool ok) { cp_async_bytes<16>(smem, gmem, ok); }
__device__ inline void cp_async4(float* smem, const float* gmem, bool ok) { cp_async_bytes<4>(smem, gmem, ok); }
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// all but the newest `pending` committed groups of this thread's copies landed
template <int pending>
__device__ inline void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory"); }

}  // namespace tc
