// Element types, conversions, vector loads and warp reductions shared by every kernel; needs no CUDA header,
// so the same source compiles under NVRTC (CuPy) and nvcc.
#pragma once

// 16-bit element types are carried as their raw bits; arithmetic always happens in float32.
struct half_t {
  unsigned short bits;
};
struct bfloat16_t {
  unsigned short bits;
};

// FP8 e4m3 (the KV cache's 8-bit format), carried as its raw bits; a cache stores value / scale. The conversions
// are sm_89 instructions; the launchers refuse FP8 on older devices, where these trap.
struct fp8_e4m3_t {
  unsigned char bits;
};

template <typename A, typename B>
struct same_type {
  static constexpr bool value = false;
};
template <typename A>
struct same_type<A, A> {
  static constexpr bool value = true;
};

// Programmatic dependent launch (sm_90+). The launcher lets each kernel start while the kernel before it in the
// stream still runs (ModuleCache.launch_params), so every kernel calls wait_for_prior_grid() before it reads what
// the kernel before it wrote or writes anything: it returns once the grid before has finished and its writes are
// visible. Then launch_next_grid() lets the kernel after this one start; it waits in turn. Since each kernel lets
// the next start only after its own wait, every grid before the one just before has finished when a kernel starts:
// only loads of what that one kernel cannot be writing may come first (weights in decode_gemv; the block table,
// lengths and older tokens' K/V in paged_decode, see tests/kernels/test_dependent_launch.py).
// Without a programmatic launch (older devices, launches by other libraries) both are no-ops. The launcher defines
// PAGEDSERVE_DEPENDENT_LAUNCH when it will launch programmatically: code built for an older architecture then has no
// wait to offer, and must not build.
#if defined(PAGEDSERVE_DEPENDENT_LAUNCH) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "programmatic dependent launch needs griddepcontrol (compute capability 9.0); this build targets an older one"
#endif
__device__ __forceinline__ void wait_for_prior_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_next_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Both, at the top of a kernel that has nothing to load before it waits.
__device__ __forceinline__ void begin_dependent_grid() {
  wait_for_prior_grid();
  launch_next_grid();
}

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000u); }

// 2^x on the special function unit, results below float32's normals (2^-126) flushed to zero: softmax weights so
// small move nothing. exp2f keeps them, which takes three more instructions a call around the same unit.
__device__ __forceinline__ float exp2_flushed(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_float(bfloat16_t x) {
  return __uint_as_float(static_cast<unsigned>(x.bits) << 16);
}

// Two e4m3 values (the low byte first) as two float16 values (the low half first), exactly: every e4m3 value is a
// float16 value.
__device__ __forceinline__ unsigned e4m3x2_to_half2(unsigned short pair) {
#if __CUDA_ARCH__ >= 890
  unsigned halves;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"(pair));
  return halves;
#else
  __trap();
  return 0u;
#endif
}

__device__ __forceinline__ float to_float(fp8_e4m3_t x) {
  return to_float(half_t{static_cast<unsigned short>(e4m3x2_to_half2(x.bits) & 0xffffu)});
}

template <typename T>
__device__ __forceinline__ T from_float(float f);
template <>
__device__ __forceinline__ float from_float<float>(float f) {
  return f;
}
template <>
__device__ __forceinline__ half_t from_float<half_t>(float f) {
  half_t x;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x.bits) : "f"(f));
  return x;
}
template <>
__device__ __forceinline__ bfloat16_t from_float<bfloat16_t>(float f) {
  bfloat16_t x;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x.bits) : "f"(f));
  return x;
}

// Round to nearest even, saturating to +-448 (satfinite) as torch's reference clamps before converting.
template <>
__device__ __forceinline__ fp8_e4m3_t from_float<fp8_e4m3_t>(float f) {
#if __CUDA_ARCH__ >= 890
  unsigned short pair;  // the second source operand lands in the low byte
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(f));
  return fp8_e4m3_t{static_cast<unsigned char>(pair & 0xffu)};
#else
  __trap();
  return fp8_e4m3_t{0};
#endif
}

// N consecutive elements moved by one load or store instruction (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* __restrict__ src) {
  return *reinterpret_cast<const Pack<T, N>*>(src);
}

template <typename T, int N>
__device__ __forceinline__ void load_as_float(const T* __restrict__ src, float (&dst)[N]) {
  const Pack<T, N> pack = load_pack<T, N>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = to_float(pack.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_from_float(T* __restrict__ dst, const float (&src)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(src[i]);
  *reinterpret_cast<Pack<T, N>*>(dst) = pack;
}

// Sum over the lanes whose index differs only in the bits of [first_offset, 32).
template <int FIRST_OFFSET, int LAST_OFFSET>
__device__ __forceinline__ float xor_sum(float x) {
#pragma unroll
  for (int offset = FIRST_OFFSET; offset <= LAST_OFFSET; offset *= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

struct Add {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// The larger of a and b, NaN if either is (max.NaN, sm_80+), as torch's amax propagates NaN; fmaxf would drop it.
struct MaxPropagatingNan {
  __device__ __forceinline__ float operator()(float a, float b) const {
    float m;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b));
    return m;
  }
};

// combine (Add, MaxPropagatingNan) of x over the lanes of a warp, returned to every lane.
template <typename Combine>
__device__ __forceinline__ float warp_reduce(float x, Combine combine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = combine(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Which sequence and query row a CTA serves, and how much context that row sees.
struct RowTask {
  int seq;
  int row;          // index into query / out
  int context_len;  // the row attends to positions [0, context_len)
};

// rows_by_seq: index is a sequence and only sequences with exactly one query row are served (decode);
// otherwise index is a query row, mapped to its sequence by binary search over query_start_loc.
// Returns false when the CTA has nothing to do (padding row, or a sequence another kernel serves).
__device__ __forceinline__ bool resolve_row(int index, bool rows_by_seq, int num_seqs,
                                            const int* __restrict__ seq_lens,
                                            const int* __restrict__ query_start_loc, RowTask& task) {
  int seq;
  if (rows_by_seq) {
    // All three loads are issued before any is used: one memory round trip.
    seq = index;
    const int q_start = query_start_loc[seq], q_end = query_start_loc[seq + 1], seq_len = seq_lens[seq];
    if (q_end - q_start != 1) return false;
    task.seq = seq;
    task.row = q_start;
    task.context_len = seq_len;
    return true;
  } else {
    if (index >= query_start_loc[num_seqs]) return false;
    int lo = 0, hi = num_seqs - 1;  // largest seq with query_start_loc[seq] <= index
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (query_start_loc[mid] <= index) lo = mid; else hi = mid - 1;
    }
    seq = lo;
  }
  const int q_start = query_start_loc[seq];
  const int q_len = query_start_loc[seq + 1] - q_start;
  task.seq = seq;
  task.row = index;
  task.context_len = seq_lens[seq] - q_len + (index - q_start) + 1;
  return true;
}
