// Weight GEMV for the few rows of a decode step: out[m, n] = T(scale[n] * sum_k x[m, k] * float(w[n, k]) (+ bias[n])),
// accumulated in float32, for 16-bit weights (W = T, no scales: 1) and FP8 weights (W = fp8_e4m3_t, W8A16). The
// activations are not quantized; each e4m3 weight is widened exactly (every e4m3 value is a float16 value) and
// multiplied in float32.
//
// At a handful of rows the product is bound by reading W once, so the kernel is built to stream it: each warp owns
// CHANNELS output channels (adjacent rows of W), each lane loads 16 bytes (16 e4m3 or 8 16-bit weights) of every
// channel per vector, UNROLL vectors at a time, and requests the next UNROLL before it uses these: up to
// 2 * CHANNELS * UNROLL 16-byte loads in flight per lane. The first batch is requested before the kernel waits for
// the one before it (a programmatic dependent launch, kernel_common.cuh), so W starts streaming while that kernel
// ends: what a library's GEMV, launched plainly, cannot do. W is read with a load that does not allocate in L1 (it is
// touched once); x goes through the read-only cache: every warp of the grid reads all of it, so it stays in L1 / L2.
// More channels per warp read x fewer times per byte of W (what limits more rows), fewer spread the channels over
// more warps (what fills the SMs at one row).
#include "kernel_common.cuh"

constexpr int kGemvWarps = 4;  // warps per CTA: the launcher's WARPS

// 16 bytes of W, read once: not allocated in L1, where x stays.
__device__ __forceinline__ uint4 load_streaming(const uint4* __restrict__ src) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(src));
  return v;
}

__device__ __forceinline__ float half_bits_to_float(unsigned bits) {
  return to_float(half_t{static_cast<unsigned short>(bits & 0xffffu)});
}

// The weights of one 16-byte vector of W as float32, the lowest address first: 8 16-bit weights, or (the
// specialisation below) 16 e4m3 weights widened exactly.
template <typename W>
struct WeightVector {
  static constexpr int kCount = 8;
  static __device__ __forceinline__ void widen(const uint4& packed, float (&w)[kCount]) {
    const Pack<W, 8> pack = *reinterpret_cast<const Pack<W, 8>*>(&packed);
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = to_float(pack.v[i]);
  }
};

template <>
struct WeightVector<fp8_e4m3_t> {
  static constexpr int kCount = 16;
  static __device__ __forceinline__ void widen(const uint4& packed, float (&w)[kCount]) {
    const unsigned words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned low = e4m3x2_to_half2(static_cast<unsigned short>(words[i] & 0xffffu));
      const unsigned high = e4m3x2_to_half2(static_cast<unsigned short>(words[i] >> 16));
      w[4 * i] = half_bits_to_float(low);
      w[4 * i + 1] = half_bits_to_float(low >> 16);
      w[4 * i + 2] = half_bits_to_float(high);
      w[4 * i + 3] = half_bits_to_float(high >> 16);
    }
  }
};

// 16 bytes through the read-only (non-coherent) cache.
__device__ __forceinline__ uint4 load_read_only(const uint4* __restrict__ src) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(src));
  return v;
}

// N consecutive elements of x (16-bit T: N / 8 16-byte loads through the read-only cache) as float32.
template <typename T, int N>
__device__ __forceinline__ void load_x(const T* __restrict__ src, float (&x)[N]) {
  static_assert(sizeof(T) == 2 && N % 8 == 0, "x is float16 or bfloat16, read 8 elements a load");
  const uint4* vectors = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int part = 0; part < N / 8; ++part) {
    const uint4 v = load_read_only(vectors + part);
    const Pack<T, 8> pack = *reinterpret_cast<const Pack<T, 8>*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) x[8 * part + i] = to_float(pack.v[i]);
  }
}

// UNROLL vectors of each of CHANNELS rows of W for a lane, 32 vectors apart from vector `first` on: all loads
// issued before any is used. Vectors past the row's end are zeros and never read.
template <int UNROLL, int CHANNELS>
__device__ __forceinline__ void load_weight_batch(const uint4* const (&w_rows)[CHANNELS], int first, int num_vectors,
                                                  uint4 (&packed)[UNROLL][CHANNELS]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int vector = first + 32 * u;
#pragma unroll
    for (int c = 0; c < CHANNELS; ++c) {
      packed[u][c] = vector < num_vectors ? load_streaming(w_rows[c] + vector) : uint4{0u, 0u, 0u, 0u};
    }
  }
}

// Grid: ceil(num_channels / (kGemvWarps * CHANNELS)) CTAs of kGemvWarps warps. x [ROWS, k] (rows x_row_stride
// elements apart, each 16-byte aligned), w [num_channels, k] row-major (k a whole number of 16-byte vectors, 16-byte
// aligned), scales float32 [num_channels] (FP8 weights) or null (16-bit weights: 1), bias T [num_channels] or null,
// out T [ROWS, num_channels] contiguous.
template <typename T, typename W, int ROWS, int CHANNELS>
__global__ void __launch_bounds__(kGemvWarps * 32)
decode_gemv(const T* __restrict__ x, long long x_row_stride, const W* __restrict__ w,
            const float* __restrict__ scales, const T* __restrict__ bias, T* __restrict__ out, int num_channels,
            int k) {
  constexpr int UNROLL = 2;  // with the next batch's loads in flight: 4 * CHANNELS loads a lane
  const int lane = threadIdx.x % 32;
  const int first_channel = (blockIdx.x * kGemvWarps + threadIdx.x / 32) * CHANNELS;
  if (first_channel >= num_channels) return;  // a whole warp leaves together: the shuffles below stay full
  constexpr int kWeightsPerVector = WeightVector<W>::kCount;
  const int num_vectors = k / kWeightsPerVector;
  const uint4* w_rows[CHANNELS];
#pragma unroll
  for (int c = 0; c < CHANNELS; ++c) {
    // A channel past the end re-reads the last one; its result is never stored.
    const int channel = first_channel + c < num_channels ? first_channel + c : num_channels - 1;
    w_rows[c] = reinterpret_cast<const uint4*>(w + static_cast<long long>(channel) * k);
  }
  float acc[CHANNELS][ROWS];
#pragma unroll
  for (int c = 0; c < CHANNELS; ++c) {
#pragma unroll
    for (int m = 0; m < ROWS; ++m) acc[c][m] = 0.0f;
  }
  // The weights are read before the wait for the kernel before (they are written by none), so the first vectors
  // are on their way while that kernel finishes; each batch's successor is requested before the batch is used.
  uint4 packed[UNROLL][CHANNELS];
  load_weight_batch<UNROLL, CHANNELS>(w_rows, lane, num_vectors, packed);
  wait_for_prior_grid();
  launch_next_grid();
  for (int base = lane; base < num_vectors; base += 32 * UNROLL) {
    uint4 next[UNROLL][CHANNELS];
    load_weight_batch<UNROLL, CHANNELS>(w_rows, base + 32 * UNROLL, num_vectors, next);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int vector = base + 32 * u;
      if (vector >= num_vectors) break;
      float weights[CHANNELS][kWeightsPerVector];
#pragma unroll
      for (int c = 0; c < CHANNELS; ++c) WeightVector<W>::widen(packed[u][c], weights[c]);
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        float xs[kWeightsPerVector];
        load_x<T, kWeightsPerVector>(x + m * x_row_stride + vector * kWeightsPerVector, xs);
#pragma unroll
        for (int c = 0; c < CHANNELS; ++c) {
#pragma unroll
          for (int i = 0; i < kWeightsPerVector; ++i) acc[c][m] = fmaf(xs[i], weights[c][i], acc[c][m]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int c = 0; c < CHANNELS; ++c) packed[u][c] = next[u][c];
    }
  }
#pragma unroll
  for (int c = 0; c < CHANNELS; ++c) {
    const int channel = first_channel + c;
    const int read_channel = channel < num_channels ? channel : num_channels - 1;
    const float scale = scales != nullptr ? scales[read_channel] : 1.0f;
    const float shift = bias != nullptr ? to_float(bias[read_channel]) : 0.0f;
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      const float sum = warp_reduce(acc[c][m], Add{});
      // Lane c * ROWS + m stores this output: the stores of a warp spread over its lanes.
      if (lane == (c * ROWS + m) % 32 && channel < num_channels) {
        out[m * static_cast<long long>(num_channels) + channel] = from_float<T>(fmaf(sum, scale, shift));
      }
    }
  }
}
