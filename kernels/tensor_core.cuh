// Tensor-core building blocks shared by the attention kernels and the decode GEMV: shared-window addresses,
// ldmatrix, mma.sync (sm_80 and later), the exact widening of e4m3 fragments to float16, and 16-bit pairs as float16. Needs no CUDA header, like
// kernel_common.cuh.
#pragma once

#include "kernel_common.cuh"

__device__ __forceinline__ unsigned shared_address(const void* ptr) {
  unsigned address;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(ptr));
  return address;
}

// row_address: this lane's row of the four 8x8 matrices, as a shared-window address.
__device__ __forceinline__ void load_matrix_x4(unsigned (&r)[4], unsigned row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_address));
}

__device__ __forceinline__ void load_matrix_x4_transposed(unsigned (&r)[4], unsigned row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_address));
}

// The same, from a generic pointer into shared memory.
__device__ __forceinline__ void load_matrix_x4(unsigned (&r)[4], const void* row) {
  load_matrix_x4(r, shared_address(row));
}
__device__ __forceinline__ void load_matrix_x4_transposed(unsigned (&r)[4], const void* row) {
  load_matrix_x4_transposed(r, shared_address(row));
}

// mma.sync with float32 accumulators. Fragments of lane l (PTX ISA layouts): A row-major, B column-major, C rows
// l / 4 and l / 4 + 8, columns 2 * (l % 4) + {0, 1}. top_rows_k16 is m16n8k16 with A rows 8 .. 15 zero: its
// rows 8 .. 15 of C are dropped (c holds row l / 4 only).
template <typename T>
struct Mma;

template <>
struct Mma<half_t> {
  static __device__ __forceinline__ void top_rows_k16(float (&c)[2], unsigned a0, unsigned a2, unsigned b0,
                                                      unsigned b1) {
    asm("{ .reg .f32 dropped0, dropped1;\n"
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,dropped0,dropped1}, {%2,%4,%3,%4}, {%5,%6}, "
        "{%0,%1,%7,%7}; }"
        : "+f"(c[0]), "+f"(c[1])
        : "r"(a0), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.0f));
  }
  static __device__ __forceinline__ void k16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b));
  }
  // Two floats as one register of two elements, `low` in the low half.
  static __device__ __forceinline__ unsigned pack(float low, float high) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(high), "f"(low));
    return r;
  }
};

template <>
struct Mma<bfloat16_t> {
  static __device__ __forceinline__ void top_rows_k16(float (&c)[2], unsigned a0, unsigned a2, unsigned b0,
                                                      unsigned b1) {
    asm("{ .reg .f32 dropped0, dropped1;\n"
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,dropped0,dropped1}, {%2,%4,%3,%4}, {%5,%6}, "
        "{%0,%1,%7,%7}; }"
        : "+f"(c[0]), "+f"(c[1])
        : "r"(a0), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.0f));
  }
  static __device__ __forceinline__ void k16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b));
  }
  static __device__ __forceinline__ unsigned pack(float low, float high) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(high), "f"(low));
    return r;
  }
};

// The bytes of {high, low} picked by `selector` (prmt: nibble i names result byte i; bytes 0..3 are low's).
__device__ __forceinline__ unsigned byte_permute(unsigned low, unsigned high, unsigned selector) {
  unsigned r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(low), "r"(high), "r"(selector));
  return r;
}

// Four e4m3 values (bytes 0 .. 3 of `bytes`) as two registers of two float16, exactly (every e4m3 value is a
// float16 value): `even` holds bytes 0 and 2, `odd` bytes 1 and 3 (the lower byte in the low half), the pairing the
// mma fragments of e4m3 rows read by ldmatrix need (decode_mma_state.cuh). Two byte permutes and two conversions;
// the e4m3 NaN codes become NaN (the pools start zeroed and writers saturate, so only a NaN written stays one).
__device__ __forceinline__ void widen_e4m3x4(unsigned bytes, unsigned& even, unsigned& odd) {
  even = e4m3x2_to_half2(static_cast<unsigned short>(byte_permute(bytes, 0u, 0x4420u)));
  odd = e4m3x2_to_half2(static_cast<unsigned short>(byte_permute(bytes, 0u, 0x4431u)));
}

// Two x values packed in a word (the lower position in the low half) as float16, times kScale: x's own bits for
// float16. bfloat16 reaches far beyond float16's range, so the pair is scaled by 2^-8 (exactly, in one bfloat16x2
// fma), each widened exactly (a bfloat16 value is the top half of its float32) and rounded to float16 once; the
// product is scaled back up at the end. Exact for |x| from 2^-6 to 2^24, to within 2^-16 below; beyond, it overflows.
template <typename T>
struct HalfPairs;

template <>
struct HalfPairs<half_t> {
  static constexpr float kScale = 1.0f;
  static __device__ __forceinline__ unsigned convert(unsigned pair) { return pair; }
};

template <>
struct HalfPairs<bfloat16_t> {
  static constexpr float kScale = 1.0f / 256.0f;
  static __device__ __forceinline__ unsigned convert(unsigned pair) {
    unsigned scaled;  // pair * 2^-8 + -0 (bfloat16 2^-8 is 0x3b80)
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(scaled) : "r"(pair), "r"(0x3b803b80u), "r"(0x80008000u));
    return Mma<half_t>::pack(__uint_as_float(scaled << 16), __uint_as_float(scaled & 0xffff0000u));
  }
};
