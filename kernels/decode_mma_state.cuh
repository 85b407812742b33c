// Tensor-core math of paged_decode's warps over staged K/V tiles (see paged_decode.cu).
#pragma once

#include "decode_softmax.cuh"
#include "tensor_core.cuh"

// Tensor-core math of one warp, two mma forms:
// - S = Q K^T: the CTA's query heads are rows 0 .. HEADS - 1 of A (rows 8 .. 15 are zero), so lane l holds the
//   scores of head l / 4 for tokens 2 * (l % 4) + {0, 1} of each n8 tile, and keeps that head's softmax state.
// - O^T = V^T P^T: head dims are the 16 rows of A (every accumulator register is useful), and the score
//   fragment packed to 16 bits is already the B operand P^T. Lane l accumulates dims 16 j + l / 4 (+ 8) of heads
//   2 * (l % 4) + {0, 1}.
// TMA_STAGED: the tiles' layout in shared memory is TmaPipeline's (see chunk_address).
template <typename T, int HEAD_DIM, int HEADS, int TILE, bool TMA_STAGED = false>
struct MmaState {
  using Element = T;  // of the caches
  using Query = T;    // of query and out
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kHeads = HEADS;
  static constexpr int kTile = TILE;
  static constexpr int kRowStride = TMA_STAGED ? HEAD_DIM : HEAD_DIM + 8;
  static constexpr int kKSteps = HEAD_DIM / 16;    // k16 steps of Q K^T
  static constexpr int kScoreTiles = TILE / 8;     // n8 tiles of S (tokens)
  static constexpr int kDimTiles = HEAD_DIM / 16;  // m16 tiles of O^T (head dims)
  static constexpr int kThreadsPerSm = 512;        // fits 128 registers
  static_assert(HEADS <= 8, "query heads are rows 0..7 of the mma tile");
  static_assert(HEAD_DIM % 32 == 0 && HEAD_DIM <= 128, "key fragments are read 32 dims at a time");
  static_assert(TILE == 8 || TILE % 16 == 0, "P V runs one k8 step or k16 steps over the tile's tokens");

  // Shared-window address of 16-byte chunk `chunk` of row `row` of the tile staged at `tile`. cp.async staging
  // pads rows by 16 bytes; TmaPipeline stages 128-byte rows of 64-dim column halves, chunk c of row r at c ^ r % 8
  // (the 128-byte swizzle). Either way the 8 rows one ldmatrix reads fall in different banks.
  static __device__ __forceinline__ unsigned chunk_address(unsigned tile, int row, int chunk) {
    if (TMA_STAGED) return tile + ((chunk / 8) * TILE + row) * 128 + ((chunk % 8) ^ (row % 8)) * 16;
    return tile + row * kRowStride * static_cast<int>(sizeof(T)) + chunk * 16;
  }

  unsigned q_low[kKSteps], q_high[kKSteps];  // A operand rows 0 .. 7: columns +0 and +8 of each k16 step
  float o[kDimTiles][4];                     // O^T: dims 16 j + l / 4 ([0], [1]) and + 8 ([2], [3])
  float running_max, running_sum;  // of head lane / 4; the sum covers this lane's columns until merge_warp
  float scale_log2e;
  int lane;

  __device__ __forceinline__ void start(const T* query_heads, int lane_, float scale_log2e_) {
    lane = lane_;
    scale_log2e = scale_log2e_;
    running_max = negative_infinity();
    running_sum = 0.0f;
    const int head = lane / 4;
    const unsigned* row = reinterpret_cast<const unsigned*>(query_heads + min(head, HEADS - 1) * HEAD_DIM) + lane % 4;
#pragma unroll
    for (int k = 0; k < kKSteps; ++k) {
      q_low[k] = head < HEADS ? row[8 * k] : 0u;
      q_high[k] = head < HEADS ? row[8 * k + 4] : 0u;
    }
#pragma unroll
    for (int j = 0; j < kDimTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  }

  __device__ __forceinline__ void consume(const T* keys, const T* values, int tokens_left) {
    // Even and odd k steps accumulate apart (two independent mma chains), then add up.
    float s[kScoreTiles][2], s_odd[kScoreTiles][2];
    const unsigned key_tile = shared_address(keys);
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
      s[n][0] = s[n][1] = s_odd[n][0] = s_odd[n][1] = 0.0f;
#pragma unroll
      for (int k = 0; k < kKSteps; k += 2) {
        unsigned b[4];  // key rows n * 8 .. + 7, dims k * 16 .. + 31 in four 8-dim pieces
        load_matrix_x4(b, chunk_address(key_tile, n * 8 + lane % 8, 2 * k + lane / 8));
        Mma<T>::top_rows_k16(s[n], q_low[k], q_high[k], b[0], b[1]);
        Mma<T>::top_rows_k16(s_odd[n], q_low[k + 1], q_high[k + 1], b[2], b[3]);
      }
      s[n][0] += s_odd[n][0];
      s[n][1] += s_odd[n][1];
    }

    const int first_column = 2 * (lane % 4);
    float tile_max = negative_infinity();
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[n][e] = n * 8 + first_column + e < tokens_left ? s[n][e] * scale_log2e : negative_infinity();
        tile_max = fmaxf(tile_max, s[n][e]);
      }
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float new_max = fmaxf(running_max, tile_max);
    const float rescale = scale_from(running_max, new_max);
    running_max = new_max;
    running_sum *= rescale;
    unsigned p[kScoreTiles];  // P^T as the B operand: tokens 2 * (lane % 4) + {0, 1} of n8 tile n, head lane / 4
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
      const float p0 = scale_from(s[n][0], new_max), p1 = scale_from(s[n][1], new_max);
      running_sum += p0 + p1;
      p[n] = Mma<T>::pack(p0, p1);
    }
    // This lane's O^T columns are heads 2 * (lane % 4) + {0, 1}, whose rescale factors live in lanes 4 * head.
    const float rescale_even = __shfl_sync(0xffffffffu, rescale, 8 * (lane % 4));
    const float rescale_odd = __shfl_sync(0xffffffffu, rescale, 8 * (lane % 4) + 4);
#pragma unroll
    for (int j = 0; j < kDimTiles; ++j) {
      o[j][0] *= rescale_even;
      o[j][1] *= rescale_odd;
      o[j][2] *= rescale_even;
      o[j][3] *= rescale_odd;
    }

    const unsigned value_tile = shared_address(values);
    if constexpr (TILE % 16 == 0) {
      // A = V^T of tokens k * 16 .. + 15: rows 0 .. 7 (+0, +8 tokens) then rows 8 .. 15 of each dim tile.
#pragma unroll
      for (int k = 0; k < TILE / 16; ++k) {
#pragma unroll
        for (int j = 0; j < kDimTiles; ++j) {
          unsigned a[4];
          load_matrix_x4_transposed(
              a, chunk_address(value_tile, k * 16 + lane % 8 + lane / 16 * 8, 2 * j + (lane / 8) % 2));
          Mma<T>::k16(o[j], a, p[2 * k], p[2 * k + 1]);
        }
      }
    } else {
      // A = V^T of the tile's 8 tokens: dims 16 j .. + 7 and + 8 .. + 15 of two dim tiles per ldmatrix.
#pragma unroll
      for (int j = 0; j < kDimTiles; j += 2) {
        unsigned a[4];
        load_matrix_x4_transposed(a, chunk_address(value_tile, lane % 8, 2 * j + lane / 8));
        Mma<T>::k8(o[j], a[0], a[1], p[0]);
        Mma<T>::k8(o[j + 1], a[2], a[3], p[0]);
      }
    }
  }

  // The row sums, spread over the 4 lanes of each row, are totalled.
  __device__ __forceinline__ void merge_warp() {
    running_sum += __shfl_xor_sync(0xffffffffu, running_sum, 1);
    running_sum += __shfl_xor_sync(0xffffffffu, running_sum, 2);
  }

  // Warp `warp`'s result into merge_acc [warps][HEADS][HEAD_DIM] and merge_stats [warps][HEADS][max, sum].
  __device__ __forceinline__ void publish(float* merge_acc, float* merge_stats, int warp) const {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int head = 2 * (lane % 4) + e;
      if (head < HEADS) {
        float* row = merge_acc + (warp * HEADS + head) * HEAD_DIM + lane / 4;
#pragma unroll
        for (int j = 0; j < kDimTiles; ++j) {
          row[16 * j] = o[j][e];
          row[16 * j + 8] = o[j][2 + e];
        }
      }
    }
    const int head = lane / 4;
    if (head < HEADS && lane % 4 == 0) {
      merge_stats[(warp * HEADS + head) * 2] = running_max;
      merge_stats[(warp * HEADS + head) * 2 + 1] = running_sum;
    }
  }
};
