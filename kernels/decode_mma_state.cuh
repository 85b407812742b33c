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
//
// C = fp8_e4m3_t: the staged tiles hold the cache's e4m3 bytes (half the shared memory and copy bytes of a 16-bit
// tile), and each fragment is widened in registers, exactly, to float16 just before its mma (widen_e4m3x4: two
// conversions a 4-byte fragment register). The mmas are float16 whatever T: the query is rounded to float16 once
// (a bfloat16 query scaled by 2^-8 into float16's range, HalfPairs; the softmax scale carries the 2^8 back) and the
// probabilities are packed as float16 (finer than bfloat16 in [0, 1]). Widening
// the fragments rather than a staged tile into a 16-bit tile (as paged_prefill does) keeps shared memory at one
// byte read per element, adds no pass and no barrier to a warp's pipeline, and needs no 16-bit tile per warp: the
// loop stays bound by the copies. ldmatrix still moves 16-bit pairs, so an e4m3 fragment differs from a 16-bit
// one; the mma's k and m orders are free to permute (the sums over k do not care, rows of A are only renamed):
// - keys, ldmatrix of 16-byte row chunks (16 dims): lane l gets dims 4 c .. 4 c + 3 (c = l % 4) of token l / 4.
//   Widened to even dims {4c, 4c + 2} (mma k 2c, 2c + 1) and odd {4c + 1, 4c + 3} (k 2c + 8, 2c + 9); the query's
//   A fragment is loaded in the same order.
// - values, ldmatrix.trans of the same chunks: lane l gets dims 2g, 2g + 1 (g = l / 4) of tokens 2c, 2c + 1.
//   Widened per dim, they are A rows g (dim 2g) and g + 8 (dim 2g + 1) of the tile's 16 dims, with the tokens as
//   k in their natural order, so P^T is unchanged and lane l accumulates dims 16 j + 2 (l / 4) (+ 1).
// Staged e4m3 rows are HEAD_DIM bytes, swizzled rather than padded (kSwizzled: padding would cost a quarter
// more shared memory at head_dim 64, and a resident CTA per SM).
// The 16-bit type of the mmas: the query's, or float16 over an e4m3 cache.
template <typename T, bool FP8>
struct MmaOperand {
  using type = T;
};
template <typename T>
struct MmaOperand<T, true> {
  using type = half_t;
};

template <typename T, int HEAD_DIM, int HEADS, int TILE, bool TMA_STAGED = false, typename C = T>
struct MmaState {
  using Element = C;  // of the caches
  using Query = T;    // of query and out
  static constexpr bool kIsFp8 = same_type<C, fp8_e4m3_t>::value;
  using M = typename MmaOperand<T, kIsFp8>::type;  // the mma's 16-bit type
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kHeads = HEADS;
  static constexpr int kTile = TILE;
  static constexpr int kRowBytes = HEAD_DIM * static_cast<int>(sizeof(C));
  static constexpr bool kSwizzled = TMA_STAGED || kIsFp8;
  // Swizzled tiles are column blocks of kBoxBytes-byte rows (one TMA box wide), in the 128- or 64-byte swizzle.
  static constexpr int kBoxBytes = kRowBytes < 128 ? kRowBytes : 128;
  static constexpr int kBoxes = kRowBytes / kBoxBytes;
  static constexpr int kRowStride = kSwizzled ? HEAD_DIM : HEAD_DIM + 8;  // elements
  static constexpr int kKSteps = HEAD_DIM / 16;    // k16 steps of Q K^T
  // A tile is consumed in steps of at most 16 tokens (one k16 step of P V), each with its own softmax update: a
  // step's scores and probabilities are the registers it holds (32-token e4m3 tiles spilled when consumed whole).
  static constexpr int kStepTokens = TILE < 16 ? TILE : 16;
  static constexpr int kScoreTiles = kStepTokens / 8;  // n8 tiles of S (tokens) per step
  static constexpr int kDimTiles = HEAD_DIM / 16;  // m16 tiles of O^T (head dims)
  static constexpr int kThreadsPerSm = 512;        // fits 128 registers
  static_assert(kIsFp8 || same_type<C, T>::value, "the cache holds the query's type or e4m3");
  static_assert(HEADS <= 8, "query heads are rows 0..7 of the mma tile");
  static_assert(HEAD_DIM % (kIsFp8 ? 64 : 32) == 0 && HEAD_DIM <= 128,
                "key fragments are read 32 dims (e4m3: 64) at a time");
  static_assert(TILE % 16 == 0 || (TILE == 8 && !kIsFp8), "P V runs one k8 step or k16 steps over the tile's tokens");
  static_assert(kBoxBytes == 128 || kBoxBytes == 64, "swizzled rows of 64 or 128 bytes");

  // Shared-window address of 16-byte chunk `chunk` of row `row` of the tile staged at `tile`. cp.async staging of
  // 16-bit tiles pads rows by 16 bytes. Swizzled tiles (TmaPipeline's, and every e4m3 tile) hold column block
  // chunk / kBoxChunks of all rows, then the next; in 128-byte rows chunk c of row r sits at c ^ r % 8 (the
  // 128-byte swizzle), in 64-byte rows at c ^ (r / 2) % 4 (the 64-byte swizzle), as the tensor memory accelerator
  // writes them into a tile aligned to 1024 bytes. Either way the 8 rows one ldmatrix reads fall in different banks.
  static __device__ __forceinline__ unsigned chunk_address(unsigned tile, int row, int chunk) {
    constexpr int kBoxChunks = kBoxBytes / 16;
    if (kSwizzled) {
      const int swizzle = kBoxBytes == 128 ? row % 8 : (row / 2) % 4;
      return tile + ((chunk / kBoxChunks) * TILE + row) * kBoxBytes + ((chunk % kBoxChunks) ^ swizzle) * 16;
    }
    return tile + row * kRowStride * static_cast<int>(sizeof(C)) + chunk * 16;
  }

  // Where a staging copy of row `row`, bytes [byte, byte + 16), goes (TilePipeline copies 16 bytes at a time).
  static __device__ __forceinline__ unsigned staged_address(unsigned tile, int row, int byte) {
    return chunk_address(tile, row, byte / 16);
  }

  unsigned q_low[kKSteps], q_high[kKSteps];  // A operand rows 0 .. 7: columns +0 and +8 of each k16 step
  float o[kDimTiles][4];  // O^T: dims 16 j + l / 4 ([0], [1]) and + 8 ([2], [3]); e4m3: 16 j + 2 (l / 4) (+ 1)
  float running_max, running_sum;  // of head lane / 4; the sum covers this lane's columns until merge_warp
  float scale_log2e;
  int lane;

  __device__ __forceinline__ void start(const T* query_heads, int lane_, float scale_log2e_) {
    lane = lane_;
    scale_log2e = kIsFp8 ? scale_log2e_ / HalfPairs<T>::kScale : scale_log2e_;
    running_max = negative_infinity();
    running_sum = 0.0f;
    const int head = lane / 4;
    const unsigned* row = reinterpret_cast<const unsigned*>(query_heads + min(head, HEADS - 1) * HEAD_DIM);
#pragma unroll
    for (int k = 0; k < kKSteps; ++k) {
      if constexpr (kIsFp8) {  // dims 16 k + 4 c .. + 3 as {+0, +2} and {+1, +3}, the keys' widened order
        const unsigned low = head < HEADS ? row[8 * k + 2 * (lane % 4)] : 0u;
        const unsigned high = head < HEADS ? row[8 * k + 2 * (lane % 4) + 1] : 0u;
        q_low[k] = HalfPairs<T>::convert(byte_permute(low, high, 0x5410u));
        q_high[k] = HalfPairs<T>::convert(byte_permute(low, high, 0x7632u));
      } else {
        q_low[k] = head < HEADS ? row[8 * k + lane % 4] : 0u;
        q_high[k] = head < HEADS ? row[8 * k + lane % 4 + 4] : 0u;
      }
    }
#pragma unroll
    for (int j = 0; j < kDimTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  }

  // Raw scores of the 8 tokens from row `first` of the tile: this lane's head, tokens first + 2 * (lane % 4) +
  // {0, 1}. Even and odd k steps accumulate apart (two independent mma chains), then add up.
  __device__ __forceinline__ void score_tile(unsigned key_tile, int first, float (&s)[2]) const {
    float s_odd[2] = {0.0f, 0.0f};
    s[0] = s[1] = 0.0f;
    if constexpr (kIsFp8) {
#pragma unroll
      for (int k = 0; k < kKSteps; k += 4) {
        unsigned b[4];  // key rows first .. + 7, dims k * 16 .. + 63 in four 16-dim pieces
        load_matrix_x4(b, chunk_address(key_tile, first + lane % 8, k + lane / 8));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          unsigned even, odd;
          widen_e4m3x4(b[i], even, odd);
          Mma<M>::top_rows_k16(i % 2 ? s_odd : s, q_low[k + i], q_high[k + i], even, odd);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kKSteps; k += 2) {
        unsigned b[4];  // key rows first .. + 7, dims k * 16 .. + 31 in four 8-dim pieces
        load_matrix_x4(b, chunk_address(key_tile, first + lane % 8, 2 * k + lane / 8));
        Mma<T>::top_rows_k16(s, q_low[k], q_high[k], b[0], b[1]);
        Mma<T>::top_rows_k16(s_odd, q_low[k + 1], q_high[k + 1], b[2], b[3]);
      }
    }
    s[0] += s_odd[0];
    s[1] += s_odd[1];
  }

  // O^T += V^T P^T over a step's tokens, from row `first` of the tile; p: P^T as the B operand, one register per
  // n8 tile of S.
  __device__ __forceinline__ void accumulate_values(unsigned value_tile, int first, const unsigned (&p)[kScoreTiles]) {
    if constexpr (kIsFp8) {
      // Tokens k * 16 .. + 15 of dim tiles j and j + 1, matrices (tokens +0, tile j), (+8, j), (+0, j + 1),
      // (+8, j + 1): each widens to the A rows g (even) and g + 8 (odd) of its tokens' k half.
#pragma unroll
      for (int k = 0; k < kStepTokens / 16; ++k) {
#pragma unroll
        for (int j = 0; j < kDimTiles; j += 2) {
          unsigned r[4], a[4];
          const int row = first + k * 16 + lane % 8 + (lane / 8) % 2 * 8;
          load_matrix_x4_transposed(r, chunk_address(value_tile, row, j + lane / 16));
          widen_e4m3x4(r[0], a[0], a[1]);
          widen_e4m3x4(r[1], a[2], a[3]);
          Mma<M>::k16(o[j], a, p[2 * k], p[2 * k + 1]);
          widen_e4m3x4(r[2], a[0], a[1]);
          widen_e4m3x4(r[3], a[2], a[3]);
          Mma<M>::k16(o[j + 1], a, p[2 * k], p[2 * k + 1]);
        }
      }
    } else if constexpr (kStepTokens % 16 == 0) {
      // A = V^T of tokens k * 16 .. + 15: rows 0 .. 7 (+0, +8 tokens) then rows 8 .. 15 of each dim tile.
#pragma unroll
      for (int k = 0; k < kStepTokens / 16; ++k) {
#pragma unroll
        for (int j = 0; j < kDimTiles; ++j) {
          unsigned a[4];
          load_matrix_x4_transposed(
              a, chunk_address(value_tile, first + k * 16 + lane % 8 + lane / 16 * 8, 2 * j + (lane / 8) % 2));
          Mma<T>::k16(o[j], a, p[2 * k], p[2 * k + 1]);
        }
      }
    } else {
      // A = V^T of the tile's 8 tokens: dims 16 j .. + 7 and + 8 .. + 15 of two dim tiles per ldmatrix.
#pragma unroll
      for (int j = 0; j < kDimTiles; j += 2) {
        unsigned a[4];
        load_matrix_x4_transposed(a, chunk_address(value_tile, first + lane % 8, 2 * j + lane / 8));
        Mma<T>::k8(o[j], a[0], a[1], p[0]);
        Mma<T>::k8(o[j + 1], a[2], a[3], p[0]);
      }
    }
  }

  __device__ __forceinline__ void consume(const C* keys, const C* values, int tokens_left) {
    const unsigned key_tile = shared_address(keys), value_tile = shared_address(values);
#pragma unroll
    for (int first = 0; first < TILE; first += kStepTokens) {
      consume_step(key_tile, value_tile, first, tokens_left - first);
    }
  }

  // Tokens [first, first + kStepTokens) of the tile, of which those below tokens_left are in the context.
  __device__ __forceinline__ void consume_step(unsigned key_tile, unsigned value_tile, int first, int tokens_left) {
    float s[kScoreTiles][2];
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) score_tile(key_tile, first + n * 8, s[n]);

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
      p[n] = Mma<M>::pack(p0, p1);
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
    accumulate_values(value_tile, first, p);
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
        // Accumulator rows l / 4 and l / 4 + 8 of dim tile j are dims 16 j + low and 16 j + high.
        const int low = kIsFp8 ? 2 * (lane / 4) : lane / 4, high = kIsFp8 ? low + 1 : low + 8;
        float* row = merge_acc + (warp * HEADS + head) * HEAD_DIM;
#pragma unroll
        for (int j = 0; j < kDimTiles; ++j) {
          row[16 * j + low] = o[j][e];
          row[16 * j + high] = o[j][2 + e];
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
