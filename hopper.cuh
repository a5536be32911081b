// Hopper (sm_90a) building blocks of warp-specialised tile kernels, as inline PTX: mbarriers, TMA tensor
// loads and stores (tensor maps encoded on the host through the driver's entry point, so binaries need no
// -lcuda), bulk copies and reductions, warpgroup MMA (wgmma) with shared-memory matrix descriptors, named
// barriers, register reallocation and the memory-ordering helpers they need.
//
// Tile layout shared by TMA and wgmma (the "128-byte swizzle"): a tile of R rows x C bf16 columns is stored as
// C/64 column blocks of R rows x 128 bytes; inside each 1024-byte group of 8 rows, the 16-byte chunk c of row r
// sits at chunk c ^ (r % 8). TMA writes this pattern when the tensor map says CU_TENSOR_MAP_SWIZZLE_128B and
// wgmma reads it when the descriptor says so; both take the row from address bits 7-9, so every column block
// starts on a 1024-byte boundary. swz128() gives the byte offset of an element for threads that write it.
//
// wgmma accumulator layout (m64nN, fp32, 128 threads): warp w of the warpgroup owns rows 16w .. 16w + 15; with
// g = lane / 4, q = lane % 4, register d[4j + 2h + e] holds row 16w + g + 8h, column 8j + 2q + e. A from
// registers (m64k16, bf16 pairs) uses the layout of mma.sync's A: a[0] (row g, k 2q..2q+1), a[1] (row g+8),
// a[2] (row g, k 2q+8..), a[3] (row g+8, k 2q+8..), so the accumulator's columns 16k .. 16k + 15 packed to bf16
// are the A operand of the next matmul's k-step k (tc::acc_to_a with 8-column blocks 2k, 2k+1).
#pragma once
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes from cudaGetDriverEntryPoint)
#include <cudaTypedefs.h>
#include <cstdint>
#include "cuda_common.cuh"

namespace hopper {

// ---------------------------------------------------------------------------------------------------------
// host: tensor maps

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void* f = nullptr;
        cudaDriverEntryPointQueryResult found;
        cudaCheck(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
        if (found != cudaDriverEntryPointSuccess || !f) THROW("cuTensorMapEncodeTiled not found in the CUDA driver");
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
    }();
    return fn;
}

// A bf16 tensor of B batches x T rows x W elements (row-major, rows contiguous) read and written in boxes of
// 64 columns x box_rows rows of one batch, 128-byte swizzled (the box is one column block of the layout above).
// Rows past T of a batch are out of bounds: loads fill them with zeros, stores skip them.
inline CUtensorMap tensor_map_rows(const void* base, int W, int T, int B, int box_rows) {
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || W % 8 != 0 || box_rows < 1 || box_rows > 256)
        THROW("tensor map: base %p, row %d elements, box %d rows (need 16-byte alignment, rows a multiple of 8)",
              base, W, box_rows);
    CUtensorMap map;
    const cuuint64_t dims[3] = {(cuuint64_t)W, (cuuint64_t)T, (cuuint64_t)B};
    const cuuint64_t strides[2] = {(cuuint64_t)W * 2, (cuuint64_t)T * W * 2};  // bytes, of dims 1 and 2
    const cuuint32_t box[3] = {64, (cuuint32_t)box_rows, 1};
    const cuuint32_t step[3] = {1, 1, 1};
    const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dims,
                                            strides, box, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) THROW("cuTensorMapEncodeTiled failed (%d): W=%d T=%d B=%d box rows %d", (int)r, W, T, B, box_rows);
    return map;
}

// ---------------------------------------------------------------------------------------------------------
// device

__device__ inline uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// byte offset of element (r, c) (c < 64) in a 128-byte-swizzled column block
__device__ inline uint32_t swz128(int r, int c) { return r * 128 + ((((c >> 3) ^ r) & 7) << 4) + (c & 7) * 2; }

// mbarriers: a phase completes when `count` arrivals and the expected transaction bytes have come in
__device__ inline void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// makes the initialised barriers visible to the async proxy (TMA) before any use
__device__ inline void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ inline void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// waits until the phase of parity `parity` has completed (on a fresh barrier parity 1 passes at once: the
// producer's first pass through an empty ring). A wait of 2^30 polls (each try_wait suspends the thread for
// a while: minutes in all) is a pipeline bug: trap, so that the launch fails with an error instead of hanging.
__device__ inline void mbar_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred P1;\n"
        ".reg .u32 polls;\n"
        "mov.u32 polls, 0;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\n"
        "add.u32 polls, polls, 1;\n"
        "setp.eq.u32 P1, polls, 1073741824;\n"
        "@P1 trap;\n"
        "bra WAIT;\n"
        "DONE:\n"
        "}\n" ::"r"(smem_u32(bar)),
        "r"(parity)
        : "memory");
}
// one arrival for the whole warp (barriers that count warps), after all its lanes got here
__device__ inline void mbar_arrive_warp(uint64_t* bar) {
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(bar);
}

// TMA: a box of the tensor map at element coordinates (c0 column, c1 row, c2 batch) into smem, completing
// transaction bytes on `bar`; and the store of a box from smem (a bulk group)
__device__ inline void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
        : "memory");
}
__device__ inline void tma_store(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map)),
                 "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2)
                 : "memory");
}
// contiguous bytes (a multiple of 16, 16-byte aligned) global -> smem, completing on `bar`
__device__ inline void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}
// contiguous fp32 smem -> global, stored or added (bulk groups)
__device__ inline void bulk_store(void* dst, const void* src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(smem_u32(src)),
                 "r"(bytes)
                 : "memory");
}
__device__ inline void bulk_add_f32(float* dst, const float* src, uint32_t bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                 "r"(smem_u32(src)), "r"(bytes)
                 : "memory");
}
__device__ inline void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// the bulk groups of this thread but the newest N have read their smem (it may be written again)
template <int N>
__device__ inline void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory"); }
// ... and have completed their writes
template <int N>
__device__ inline void bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory"); }

// smem written by threads, then read by the async proxy (TMA store, wgmma operand)
__device__ inline void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// global memory between the generic proxy (flags, loads) and the async proxy (bulk copies)
__device__ inline void fence_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// flags between blocks
__device__ inline int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ inline void red_release_add(int* p, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// named barriers (id 0 is __syncthreads'): `count` threads, a multiple of 32, take part
__device__ inline void named_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ inline void named_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// register reallocation between warpgroups (every thread of the warpgroup executes it)
template <int R>
__device__ inline void reg_alloc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ inline void reg_dealloc() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

// ---------------------------------------------------------------------------------------------------------
// wgmma

// Shared-memory matrix descriptor of an operand in the 128-byte-swizzled layout (PTX ISA "matrix descriptor"):
//   bits  0-13 start address >> 4      bits 16-29 leading-dimension byte offset (LBO) >> 4
//   bits 32-45 stride byte offset >> 4 bits 49-51 base offset (0: every 8-row group starts 1024-aligned)
//   bits 62-63 swizzle mode (1 = 128-byte)
// K-major operand (rows along M or N, the 16 k-values of a step contiguous in a row): SBO = 1024, the step
// from one 8-row group to the next; LBO is unused (1 by convention). A k-step of 16 bf16 = 32 bytes further
// in the row is start + 32 (the swizzle is applied to the computed address, so this stays inside the atom).
// MN-major operand (the M or N index contiguous, rows along K): SBO = 1024, the step between 8-row groups
// along K; LBO = the step between 64-element column blocks along M or N.
__device__ inline uint64_t desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes) {
    return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | (uint64_t)((lbo_bytes >> 4) & 0x3FFF) << 16 |
           (uint64_t)(1024 >> 4) << 32 | 1ull << 62;
}
// the descriptor moved by `bytes` (a multiple of 16): only the start address changes, so a 32-bit add on the
// low word does (the 14-bit field never carries into bit 32), not a 64-bit one with its carry
__device__ inline uint64_t desc_add(uint64_t desc, uint32_t bytes) {
    return (desc & 0xFFFFFFFF00000000ull) | (uint32_t)((uint32_t)desc + (bytes >> 4));
}
// this thread's warpgroup, broadcast from lane 0 so that the compiler knows it is the same in the whole warp:
// descriptors computed from it then stay in uniform registers instead of being moved there before each wgmma
__device__ inline int warpgroup_index() { return __shfl_sync(0xFFFFFFFFu, (int)threadIdx.x / 128, 0); }

__device__ inline void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// all but the newest N committed wgmma groups of this warpgroup have completed
template <int N>
__device__ inline void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// keeps the compiler from moving accesses of registers that an in-flight wgmma owns across this point
template <int N>
__device__ inline void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ inline void fence_regs(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int k = 0; k < 4; k++) asm volatile("" : "+r"(r[i][k])::"memory");
}

#define HOPPER_ACC8(i) \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define HOPPER_ACC32 HOPPER_ACC8(0), HOPPER_ACC8(8), HOPPER_ACC8(16), HOPPER_ACC8(24)
#define HOPPER_OUT8(i) \
    "=f"(d[i]), "=f"(d[i + 1]), "=f"(d[i + 2]), "=f"(d[i + 3]), "=f"(d[i + 4]), "=f"(d[i + 5]), "=f"(d[i + 6]), "=f"(d[i + 7])
#define HOPPER_OUT32 HOPPER_OUT8(0), HOPPER_OUT8(8), HOPPER_OUT8(16), HOPPER_OUT8(24)
#define HOPPER_ACC64 HOPPER_ACC32, HOPPER_ACC8(32), HOPPER_ACC8(40), HOPPER_ACC8(48), HOPPER_ACC8(56)
#define HOPPER_REGS32 \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define HOPPER_REGS64                                                                                            \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28," \
    "%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55," \
    "%56,%57,%58,%59,%60,%61,%62,%63}"

// d (64 x N fp32) = A (64 x 16) B (16 x N) + (accumulate ? d : 0), bf16 operands from smem descriptors;
// TA / TB = 1: A / B MN-major (else K-major). N = 2 x the accumulator's length (64 or 128).
#define HOPPER_WGMMA_SS_N64                                                                                \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                           \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " HOPPER_REGS32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
template <int TA, int TB>
__device__ inline void wgmma_ss(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(HOPPER_WGMMA_SS_N64 : HOPPER_ACC32 : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB) : "memory");
}
// d = A B, the first k-step into an accumulator whose old value is dead: written only, so that an accumulator
// kept across loop iterations (read after its matmul finishes in the next one) is not live into the matmul
template <int TA, int TB>
__device__ inline void wgmma_ss_first(float (&d)[32], uint64_t a, uint64_t b) {
    asm volatile(HOPPER_WGMMA_SS_N64 : HOPPER_OUT32 : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB) : "memory");
}
template <int TA, int TB>
__device__ inline void wgmma_ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " HOPPER_REGS64 ", %64, %65, p, 1, 1, %67, %68;\n}\n"
        : HOPPER_ACC64
        : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB)
        : "memory");
}
// the same with A (64 x 16) from registers (the fragment layout above); only B may be MN-major
template <int TB>
__device__ inline void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " HOPPER_REGS32 ", {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
        : HOPPER_ACC32
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TB)
        : "memory");
}
template <int TB>
__device__ inline void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " HOPPER_REGS64 ", {%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n"
        : HOPPER_ACC64
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TB)
        : "memory");
}

#undef HOPPER_ACC8
#undef HOPPER_ACC32
#undef HOPPER_ACC64
#undef HOPPER_OUT8
#undef HOPPER_OUT32
#undef HOPPER_REGS32
#undef HOPPER_REGS64
#undef HOPPER_WGMMA_SS_N64

}  // namespace hopper
