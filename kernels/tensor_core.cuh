// Tensor-core building blocks shared by the attention kernels: shared-window addresses, ldmatrix, mma.sync
// (sm_80 and later) and the exact widening of e4m3 fragments to 16 bits. Needs no CUDA header, like
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

// Four e4m3 values (bytes 0 .. 3 of `bytes`) as two registers of two T, exactly: `even` holds bytes 0 and 2,
// `odd` bytes 1 and 3 (the lower byte in the low half), the pairing the mma fragments of e4m3 rows read by
// ldmatrix need (decode_mma_state.cuh). Each byte's fields are moved into place as T's bits (sign to bit 15,
// exponent and mantissa to the low end of T's exponent field and the top of its mantissa): that is the value times
// 2^-8 (float16) or 2^-120 (bfloat16), a normal or subnormal T, then multiplied back by the power of two (exact:
// the product is normal). Integer and half-precision FMA work, where the conversion instructions cost one per
// pair (float16) or four (bfloat16, through float32). The e4m3 NaN codes (only in slots outside a context:
// writers saturate) become +-480 rather than NaN.
template <typename T>
__device__ __forceinline__ void widen_e4m3x4(unsigned bytes, unsigned& even, unsigned& odd) {
  constexpr bool kIsHalf = same_type<T, half_t>::value;
  constexpr int kShift = kIsHalf ? 1 : 4;                           // from bits 8 .. 14 of a half to its field
  constexpr unsigned kFields = kIsHalf ? 0x3f803f80u : 0x07f007f0u;  // T's bits 7 .. 13 or 4 .. 10, both halves
  constexpr unsigned kSigns = 0x80008000u;
  constexpr unsigned kScale = kIsHalf ? 0x5c005c00u : 0x7b807b80u;  // 2^8 or 2^120, in both halves
  const unsigned scaled_odd = (bytes & kSigns) | ((bytes >> kShift) & kFields);
  const unsigned scaled_even = ((bytes << 8) & kSigns) | ((bytes << (8 - kShift)) & kFields);
  // x * scale + (-0) is x * scale, whatever the sign of a zero.
  if constexpr (kIsHalf) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(odd) : "r"(scaled_odd), "r"(kScale), "r"(kSigns));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(even) : "r"(scaled_even), "r"(kScale), "r"(kSigns));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(odd) : "r"(scaled_odd), "r"(kScale), "r"(kSigns));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(even) : "r"(scaled_even), "r"(kScale), "r"(kSigns));
  }
}
