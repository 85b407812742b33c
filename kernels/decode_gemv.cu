// Weight GEMVs for the few rows of a decode step: out[m, n] = T(scale[n] * sum_k x[m, k] * float(w[n, k]) (+ bias[n])),
// accumulated in float32, for 16-bit weights (W = T, no scales: 1) and FP8 weights (W = fp8_e4m3_t, W8A16). The
// activations are not quantized; each e4m3 weight is widened exactly (every e4m3 value is a float16 value).
//
// At a handful of rows the product is bound by reading W once, so both kernels are built to stream it. decode_gemv
// (one row) multiplies on the CUDA cores: each warp owns CHANNELS output channels (adjacent rows of W), each lane
// loads 16 bytes (16 e4m3 or 8 16-bit weights) of every channel per vector, UNROLL vectors at a time, and requests
// the next UNROLL before it uses these: up to 2 * CHANNELS * UNROLL 16-byte loads in flight per lane. Its cost grows
// with the rows (every row reads x again and adds its own FMAs); decode_gemv_mma's (two to sixteen rows) barely grows:
// one mma.sync takes 256 weights for all eight of its columns, two for sixteen, and W is still read once.
//
// The first batch of W is requested before the kernel waits for the one before it (a programmatic dependent launch,
// kernel_common.cuh), so W starts streaming while that kernel ends: what a library's GEMV, launched plainly, cannot
// do. W is read with a load that does not allocate in L1 (it is touched once); x goes through the read-only cache:
// every warp of the grid reads all of it, so it stays in L1 / L2.
#include "kernel_common.cuh"
#include "tensor_core.cuh"

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

// One row. Fewer channels a warp spread the channels over more warps (what fills the SMs); two a warp measured
// faster on wide weights. Grid: ceil(num_channels / (kGemvWarps * CHANNELS)) CTAs of kGemvWarps warps. x [1, k]
// (16-byte aligned; x_row_stride is unused, the argument list being decode_gemv_mma's), w [num_channels, k]
// row-major (k a whole number of 16-byte vectors, 16-byte aligned), scales float32 [num_channels] (FP8 weights) or
// null (16-bit weights: 1), bias T [num_channels] or null, out T [1, num_channels].
template <typename T, typename W, int CHANNELS>
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
  float acc[CHANNELS];
#pragma unroll
  for (int c = 0; c < CHANNELS; ++c) acc[c] = 0.0f;
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
      float xs[kWeightsPerVector];
      load_x<T, kWeightsPerVector>(x + vector * kWeightsPerVector, xs);
#pragma unroll
      for (int c = 0; c < CHANNELS; ++c) {
#pragma unroll
        for (int i = 0; i < kWeightsPerVector; ++i) acc[c] = fmaf(xs[i], weights[c][i], acc[c]);
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
    const float sum = warp_reduce(acc[c], Add{});
    // Lane c stores this output: the stores of a warp spread over its lanes.
    if (lane == c && channel < num_channels) out[channel] = from_float<T>(fmaf(sum, scale, shift));
  }
}

// ---- two to sixteen rows, on the tensor cores ----
//
// A CTA owns 16 output channels (an mma's rows); the rows of x are the mma's columns, 8 a tile (two tiles from 9
// rows on, sharing each A fragment); the CTA's warps split k. A lane's fragments come straight from its 16-byte
// loads of W (a weight's position in k does not matter to a sum, as long as x is read at the same positions): lane l
// reads the same 16-byte vector of channels l / 4 and l / 4 + 8, and the x values at that vector's positions for row
// l / 4 of each tile (a real row again past the last: columns past ROWS are never stored). A 16-bit vector is two
// mmas of W's dtype a tile as loaded; an e4m3 vector is four float16 mmas a tile after the exact widening of each
// pair of weights, with x rounded to float16 once per vector.
constexpr int kGemvMmaWarps = 8;  // warps per CTA, splitting k: the launcher's MMA_WARPS
constexpr int kGemvMmaChannels = 16;  // output channels per CTA: an mma's rows; the launcher's MMA_CHANNELS

__device__ __forceinline__ unsigned word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// What one 16-byte vector of each of a lane's two channels adds to its accumulators. kWeights: weights a vector;
// kXVectors: 16-byte loads of x at their positions; kScale: the factor the sums carry (undone when stored).
template <typename T, typename W>
struct VectorProduct {  // 16-bit weights of x's dtype: two mmas of W's dtype a tile, fragments as loaded
  static constexpr int kWeights = 8;
  static constexpr int kXVectors = 1;
  static constexpr float kScale = 1.0f;
  template <int TILES>
  static __device__ __forceinline__ void accumulate(float (&acc)[TILES][4], const uint4 (&channels)[2],
                                                    const uint4 (&x)[TILES][kXVectors]) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const unsigned a[4] = {word(channels[0], 2 * j), word(channels[1], 2 * j), word(channels[0], 2 * j + 1),
                             word(channels[1], 2 * j + 1)};
#pragma unroll
      for (int t = 0; t < TILES; ++t) Mma<T>::k16(acc[t], a, word(x[t][0], 2 * j), word(x[t][0], 2 * j + 1));
    }
  }
};

template <typename T>
struct VectorProduct<T, fp8_e4m3_t> {  // e4m3 weights: four float16 mmas a tile
  static constexpr int kWeights = 16;
  static constexpr int kXVectors = 2;
  static constexpr float kScale = HalfPairs<T>::kScale;
  template <int TILES>
  static __device__ __forceinline__ void accumulate(float (&acc)[TILES][4], const uint4 (&channels)[2],
                                                    const uint4 (&x)[TILES][kXVectors]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const unsigned first = word(channels[0], j), second = word(channels[1], j);  // channels l / 4, l / 4 + 8
      const unsigned a[4] = {e4m3x2_to_half2(static_cast<unsigned short>(first & 0xffffu)),
                             e4m3x2_to_half2(static_cast<unsigned short>(second & 0xffffu)),
                             e4m3x2_to_half2(static_cast<unsigned short>(first >> 16)),
                             e4m3x2_to_half2(static_cast<unsigned short>(second >> 16))};
#pragma unroll
      for (int t = 0; t < TILES; ++t) {
        Mma<half_t>::k16(acc[t], a, HalfPairs<T>::convert(word(x[t][j / 2], 2 * (j % 2))),
                         HalfPairs<T>::convert(word(x[t][j / 2], 2 * (j % 2) + 1)));
      }
    }
  }
};

// A lane's operands for BATCH of its k-steps, kGemvMmaWarps steps apart (one 16-byte vector of each of its two
// channels a step, at vector 4 * step + l % 4): zeros past the last vector and for a second channel past the last,
// which are multiplied but add nothing (a first channel past the last is the last one again, never stored). w_lane:
// the lane's first channel; its second is row_vectors vectors on.
template <int BATCH>
__device__ __forceinline__ void load_mma_weights(const uint4* __restrict__ w_lane, long long row_vectors,
                                                 bool has_second, int first_vector, int num_vectors,
                                                 uint4 (&packed)[BATCH][2]) {
#pragma unroll
  for (int u = 0; u < BATCH; ++u) {
    const int vector = first_vector + 4 * kGemvMmaWarps * u;
    packed[u][0] = vector < num_vectors ? load_streaming(w_lane + vector) : uint4{0u, 0u, 0u, 0u};
    packed[u][1] = vector < num_vectors && has_second ? load_streaming(w_lane + row_vectors + vector)
                                                      : uint4{0u, 0u, 0u, 0u};
  }
}

template <int BATCH, int TILES, int X_VECTORS>
__device__ __forceinline__ void load_mma_x(const uint4* const (&x_rows)[TILES], int first_vector, int num_vectors,
                                           uint4 (&xs)[BATCH][TILES][X_VECTORS]) {
#pragma unroll
  for (int u = 0; u < BATCH; ++u) {
    const int vector = first_vector + 4 * kGemvMmaWarps * u;
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int i = 0; i < X_VECTORS; ++i) {
        xs[u][t][i] = vector < num_vectors ? load_read_only(x_rows[t] + X_VECTORS * vector + i)
                                           : uint4{0u, 0u, 0u, 0u};
      }
    }
  }
}

// A batch's products: its steps up to the last vector (warp_vector: the warp's first vector of the batch).
template <typename Product, int BATCH, int TILES, int X_VECTORS>
__device__ __forceinline__ void multiply_batch(float (&acc)[TILES][4], const uint4 (&packed)[BATCH][2],
                                               const uint4 (&xs)[BATCH][TILES][X_VECTORS], int warp_vector,
                                               int num_vectors) {
#pragma unroll
  for (int u = 0; u < BATCH; ++u) {
    if (warp_vector + 4 * kGemvMmaWarps * u >= num_vectors) break;
    Product::accumulate(acc, packed[u], xs[u]);
  }
}

// Grid: ceil(num_channels / kGemvMmaChannels) CTAs of kGemvMmaWarps warps. Arguments as decode_gemv's, but x
// [ROWS, k] with rows x_row_stride elements apart (each 16-byte aligned) and out [ROWS, num_channels]; ROWS 1..16.
template <typename T, typename W, int ROWS>
__global__ void __launch_bounds__(kGemvMmaWarps * 32)
decode_gemv_mma(const T* __restrict__ x, long long x_row_stride, const W* __restrict__ w,
                const float* __restrict__ scales, const T* __restrict__ bias, T* __restrict__ out, int num_channels,
                int k) {
  static_assert(ROWS >= 1 && ROWS <= 16, "two tiles of an mma's 8 columns");
  constexpr int TILES = (ROWS + 7) / 8;
  using Product = VectorProduct<T, W>;
  constexpr int BATCH = 2;  // k-steps a batch, with the next batch's loads in flight: 4 weight vectors a lane
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int group = lane / 4;  // the lane's channel (and 8 past it) and its row of x
  const int num_vectors = k / Product::kWeights;
  const int lane_channel = blockIdx.x * kGemvMmaChannels + group;
  // A lane's first channel past the end re-reads the last one (its sums are never stored); a second past the end
  // is not read.
  const long long lane_row = min(lane_channel, num_channels - 1);
  const uint4* w_lane = reinterpret_cast<const uint4*>(w + lane_row * k);
  const long long row_vectors = 8LL * num_vectors;
  const bool has_second = lane_channel + 8 < num_channels;
  float acc[TILES][4] = {};
  const int stride = 4 * kGemvMmaWarps * BATCH;  // vectors a lane moves on by, batch to batch
  int vector = 4 * warp + lane % 4;
  // W is written by no kernel: its first batch is on its way while the kernel before ends; x is read after the wait.
  uint4 packed[BATCH][2];
  load_mma_weights<BATCH>(w_lane, row_vectors, has_second, vector, num_vectors, packed);
  wait_for_prior_grid();
  launch_next_grid();
  const uint4* x_rows[TILES];
#pragma unroll
  for (int t = 0; t < TILES; ++t) {
    x_rows[t] = reinterpret_cast<const uint4*>(x + ((group + 8 * t) % ROWS) * x_row_stride);
  }
  uint4 xs[BATCH][TILES][Product::kXVectors];
  load_mma_x<BATCH>(x_rows, vector, num_vectors, xs);
  // Two batches a turn, each loaded while the other is multiplied: no copies between them. Every lane of a warp runs
  // the same batches (the mma is warp-wide): the bound is the warp's first vector, and lanes past the last vector
  // multiply zeros.
  uint4 other[BATCH][2];
  uint4 other_xs[BATCH][TILES][Product::kXVectors];
  for (int warp_vector = 4 * warp;; warp_vector += 2 * stride, vector += 2 * stride) {
    load_mma_weights<BATCH>(w_lane, row_vectors, has_second, vector + stride, num_vectors, other);
    load_mma_x<BATCH>(x_rows, vector + stride, num_vectors, other_xs);
    multiply_batch<Product, BATCH>(acc, packed, xs, warp_vector, num_vectors);
    if (warp_vector + stride >= num_vectors) break;
    load_mma_weights<BATCH>(w_lane, row_vectors, has_second, vector + 2 * stride, num_vectors, packed);
    load_mma_x<BATCH>(x_rows, vector + 2 * stride, num_vectors, xs);
    multiply_batch<Product, BATCH>(acc, other, other_xs, warp_vector + stride, num_vectors);
    if (warp_vector + 2 * stride >= num_vectors) break;
  }
  // Accumulator i of tile t of lane l: channel l / 4 + 8 * (i / 2), row 8 t + 2 * (l % 4) + i % 2. The warps' sums
  // meet in shared memory; then one thread a (row, channel) adds them, scales and stores (a row's channels by
  // adjacent threads).
  __shared__ float partial[kGemvMmaWarps][ROWS][kGemvMmaChannels];
#pragma unroll
  for (int t = 0; t < TILES; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 8 * t + 2 * (lane % 4) + i % 2;
      if (row < ROWS) partial[warp][row][8 * (i / 2) + group] = acc[t][i];
    }
  }
  __syncthreads();
  static_assert(ROWS * kGemvMmaChannels <= kGemvMmaWarps * 32, "one thread a (row, channel)");
  const int index = threadIdx.x;
  const int row = index / kGemvMmaChannels;
  const int channel = blockIdx.x * kGemvMmaChannels + index % kGemvMmaChannels;
  if (row >= ROWS || channel >= num_channels) return;
  float sum = 0.0f;
#pragma unroll
  for (int p = 0; p < kGemvMmaWarps; ++p) sum += partial[p][row][index % kGemvMmaChannels];
  const float scale = (scales != nullptr ? scales[channel] : 1.0f) / Product::kScale;
  const float shift = bias != nullptr ? to_float(bias[channel]) : 0.0f;
  out[row * static_cast<long long>(num_channels) + channel] = from_float<T>(fmaf(sum, scale, shift));
}
