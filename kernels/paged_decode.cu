// Paged attention of single query rows over their paged context (decode, and the generic path for any row).
//
// One CTA per (query row, kv head, group of HEADS query heads of that kv head, split of the context). The query
// heads of a GQA group are processed together, so each K/V byte is read once per CTA. The context is cut into
// tiles of TILE tokens; warp w of split s takes tiles s * WARPS + w, s * WARPS + w + WARPS * num_splits, ... and
// runs its own STAGES-deep pipeline of copies (cp.async, or the tensor memory accelerator) into its private shared
// memory, so no block-wide barrier stalls the loads. Dealing tiles round-robin gives every split an equal share of
// the real context, and a warp's tiles do not depend on the context length: the block ids of its first tiles are
// read in the same memory round trip as the sequence length. Warps are merged at the end (log-sum-exp). When the
// launcher splits the context, each split writes an unnormalised partial result that paged_decode_reduce merges.
// (Merging inside this kernel, by the last split to finish, measured slower: the merge code costs the main loop
// registers and scheduling freedom even when it does not run.)
//
// The math on a staged tile is the State template argument, with an online softmax in float32, log2 units:
// - MmaState (float16 / bfloat16, head_dim 64 or 128): S = Q K^T and O^T = V^T P^T on mma.sync (see there).
//   On sm_90 with blocks of at least 8 tokens its tiles are staged by the tensor memory accelerator
//   (TmaPipeline): bulk copies of whole blocks stream faster than 16-byte cp.async.
// - LaneState (any dtype and head size, and FP8 caches): float32 dot products on CUDA cores. A token row of HEAD_DIM elements is
//   covered by LANES lanes, each holding VECS vectors of VEC elements (vector j of lane l is elements
//   [(j * LANES + l) * VEC, +VEC)); a warp computes 32 / LANES tokens at once, each token group (the LANES lanes
//   of one token row) keeping its own softmax until the warp merges them.
//
// KV pool: key_cache / value_cache [num_blocks, num_kv_heads, block_size, HEAD_DIM]; the token at position p
// of sequence s is in block block_tables[s, p / block_size] at offset p % block_size. The pool holds the query's
// dtype, or FP8 (LaneState only): e4m3 keys and values, dequantized as they are read from the staged tile. Their
// scales never touch the loop: the key scale is folded into scale_log2e by the launcher, and the value scale
// multiplies each CTA's (unnormalised) result, which is linear in the values.
#include "bulk_copy.cuh"
#include "tensor_core.cuh"

// dst: a shared-window address; src_bytes 0 fills the BYTES with zeros. The 16-byte copies ask L2 to fetch
// whole 128-byte lines (a warp's copies cover them anyway): measured 1.5-2% faster on bandwidth-bound grids.
template <int BYTES>
__device__ __forceinline__ void copy_async(unsigned dst, const void* src, int src_bytes) {
  if (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(BYTES), "r"(src_bytes));
  }
}

// exp2(x - m) with the convention that a max of -inf (nothing seen yet) scales everything to 0.
__device__ __forceinline__ float scale_from(float x, float m) {
  return m == negative_infinity() ? 0.0f : exp2f(x - m);
}

// Loads the lane's slice of one token row (global or shared); slots past head_dim read as zero.
template <typename T, int HEAD_DIM, int VEC, int LANES, int VECS>
__device__ __forceinline__ void load_slice(const T* __restrict__ token_row, int lane_in_token,
                                           float (&x)[VEC * VECS]) {
#pragma unroll
  for (int j = 0; j < VECS; ++j) {
    const int vec = j * LANES + lane_in_token;
    float part[VEC];
    if ((HEAD_DIM / VEC) % LANES == 0 || vec < HEAD_DIM / VEC) {
      load_as_float<T, VEC>(token_row + vec * VEC, part);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) part[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[j * VEC + e] = part[e];
  }
}

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

// CUDA-core math of one warp: each token group keeps an online softmax over its tokens for HEADS query heads.
// Query of T; staged keys and values of C (T, or fp8_e4m3_t), VEC elements of either per load.
template <typename T, int HEAD_DIM, int VEC, int LANES, int VECS, int HEADS, int TILE, typename C = T>
struct LaneState {
  using Element = C;
  using Query = T;
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kHeads = HEADS;
  static constexpr int kTile = TILE;
  static constexpr int kRowStride = HEAD_DIM;
  static constexpr int kTokensPerPass = 32 / LANES;
  static constexpr int kPasses = TILE / kTokensPerPass;
  static constexpr int kLaneElems = VEC * VECS;
  static constexpr int kNumVecs = HEAD_DIM / VEC;
  // Small per-lane state (query, accumulators, a tile's scores) fits 128 registers: 512 threads per SM.
  static constexpr int kThreadsPerSm = 2 * HEADS * kLaneElems + kPasses * HEADS <= 96 ? 512 : 128;
  static_assert(HEAD_DIM % VEC == 0, "VEC must divide HEAD_DIM");
  static_assert(32 % LANES == 0, "LANES must divide the warp");
  static_assert(LANES * VECS >= kNumVecs, "lanes must cover head_dim");
  static_assert(TILE % kTokensPerPass == 0, "a tile is whole passes");

  float q[HEADS][kLaneElems];  // pre-scaled by softmax scale * log2(e)
  float acc[HEADS][kLaneElems];
  float running_max[HEADS], running_sum[HEADS];
  int lane_in_token, token_in_pass, lane;

  __device__ __forceinline__ void start(const T* query_heads, int lane_, float scale_log2e) {
    lane = lane_;
    lane_in_token = lane % LANES;
    token_in_pass = lane / LANES;
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
      load_slice<T, HEAD_DIM, VEC, LANES, VECS>(query_heads + g * HEAD_DIM, lane_in_token, q[g]);
      running_max[g] = negative_infinity();
      running_sum[g] = 0.0f;
#pragma unroll
      for (int e = 0; e < kLaneElems; ++e) {
        q[g][e] *= scale_log2e;
        acc[g][e] = 0.0f;
      }
    }
  }

  // Scores of the group's tokens in the tile, one rescale per tile, then p * v accumulated.
  __device__ __forceinline__ void consume(const C* keys, const C* values, int tokens_left) {
    float score[kPasses][HEADS];
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int local = pass * kTokensPerPass + token_in_pass;
      float kx[kLaneElems];
      load_slice<C, HEAD_DIM, VEC, LANES, VECS>(keys + local * HEAD_DIM, lane_in_token, kx);
#pragma unroll
      for (int g = 0; g < HEADS; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kLaneElems; ++e) dot = fmaf(q[g][e], kx[e], dot);
        if (LANES > 1) dot = xor_sum<1, LANES / 2>(dot);
        score[pass][g] = local < tokens_left ? dot : negative_infinity();
      }
    }
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
      float tile_max = negative_infinity();
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) tile_max = fmaxf(tile_max, score[pass][g]);
      const float new_max = fmaxf(running_max[g], tile_max);
      const float rescale = scale_from(running_max[g], new_max);
      running_max[g] = new_max;
      running_sum[g] *= rescale;
#pragma unroll
      for (int e = 0; e < kLaneElems; ++e) acc[g][e] *= rescale;
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        score[pass][g] = scale_from(score[pass][g], new_max);  // now the probability numerator
        running_sum[g] += score[pass][g];
      }
    }
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      float vx[kLaneElems];
      load_slice<C, HEAD_DIM, VEC, LANES, VECS>(values + (pass * kTokensPerPass + token_in_pass) * HEAD_DIM,
                                                lane_in_token, vx);
#pragma unroll
      for (int g = 0; g < HEADS; ++g) {
#pragma unroll
        for (int e = 0; e < kLaneElems; ++e) acc[g][e] = fmaf(score[pass][g], vx[e], acc[g][e]);
      }
    }
  }

  // Log-sum-exp merge of the warp's token groups: afterwards every group holds the warp's result.
  __device__ __forceinline__ void merge_warp() {
#pragma unroll
    for (int offset = LANES; offset < 32; offset *= 2) {
#pragma unroll
      for (int g = 0; g < HEADS; ++g) {
        const float other_max = __shfl_xor_sync(0xffffffffu, running_max[g], offset);
        const float other_sum = __shfl_xor_sync(0xffffffffu, running_sum[g], offset);
        const float new_max = fmaxf(running_max[g], other_max);
        const float mine = scale_from(running_max[g], new_max), theirs = scale_from(other_max, new_max);
        running_sum[g] = running_sum[g] * mine + other_sum * theirs;
        running_max[g] = new_max;
#pragma unroll
        for (int e = 0; e < kLaneElems; ++e)
          acc[g][e] = acc[g][e] * mine + __shfl_xor_sync(0xffffffffu, acc[g][e], offset) * theirs;
      }
    }
  }

  // Warp `warp`'s result into merge_acc [warps][HEADS][HEAD_DIM] and merge_stats [warps][HEADS][max, sum].
  __device__ __forceinline__ void publish(float* merge_acc, float* merge_stats, int warp) const {
    if (lane >= LANES) return;  // token group 0 of the warp holds the merged result
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        const int vec = j * LANES + lane;
        if (vec < kNumVecs) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) merge_acc[(warp * HEADS + g) * HEAD_DIM + vec * VEC + e] = acc[g][j * VEC + e];
        }
      }
      if (lane == 0) {
        merge_stats[(warp * HEADS + g) * 2] = running_max[g];
        merge_stats[(warp * HEADS + g) * 2 + 1] = running_sum[g];
      }
    }
  }
};

// Block ids of one warp's tiles k = 0, 1, ... (tile k starts at token (first_tile + k * tile_stride) * TILE), read
// in windows of window_tiles tiles: lane l holds the id of block slot l % span of tile l / span (span: the most
// blocks one tile can touch). A window is read from the block table while the one before it is copied, and each
// copy takes its id from the owning lane by shuffle, so no copy waits on a table read.
template <int TILE>
struct BlockWindow {
  const int* table;
  int log2_block_size, table_width, first_tile, tile_stride, my_tiles, context_len, lane;
  int span, window_tiles;   // block slots per tile (at most 32, see decode_layout), tiles per window
  int window_first;         // the first tile of the current window
  int window, next_window;  // this lane's block id in the current and the next window (-1 past the table)

  __device__ __forceinline__ int tile_start(int k) const { return (first_tile + k * tile_stride) * TILE; }

  // This lane's block id of the window whose first tile is k, bounded by the table width only: it needs no
  // context length, so the first two windows are read before the sequence length arrives.
  __device__ __forceinline__ int window_block(int k) const {
    const int block = (tile_start(k + lane / span) >> log2_block_size) + lane % span;
    return lane < window_tiles * span && block < table_width ? table[block] : -1;
  }

  __device__ __forceinline__ void prefetch_blocks(const int* __restrict__ block_tables, int block_table_stride,
                                                  int seq) {
    table = block_tables + static_cast<long long>(seq) * block_table_stride;
    const int block_size = 1 << log2_block_size;
    span = TILE % block_size == 0 ? TILE >> log2_block_size
                                  : (block_size % TILE == 0 ? 1 : (TILE - 1) / block_size + 2);
    window_tiles = 32 / span;
    window_first = 0;
    window = window_block(0);
    next_window = window_block(window_tiles);
  }

  // The warp's share of a context of context_len_ tokens.
  __device__ __forceinline__ void set_context(int context_len_) {
    context_len = context_len_;
    const int num_tiles = (context_len + TILE - 1) / TILE;
    my_tiles = first_tile < num_tiles ? (num_tiles - 1 - first_tile) / tile_stride + 1 : 0;
  }

  // Moves to the window of tile k; tiles are entered in order.
  __device__ __forceinline__ void enter(int k) {
    if (k == window_first + window_tiles) {
      window_first = k;
      window = next_window;
      next_window = window_block(k + window_tiles);
    }
  }

  // The id of the block holding token pos of tile k, entered (a shuffle: the whole warp calls it).
  __device__ __forceinline__ int block_of(int k, int pos) const {
    const int owner = (k - window_first) * span + (pos >> log2_block_size) - (tile_start(k) >> log2_block_size);
    return __shfl_sync(0xffffffffu, window, min(owner, 31));
  }
};

// One warp's cp.async pipeline over its tiles: stage k % STAGES holds tile k's keys then values, rows of
// State::kRowStride elements; tokens past the context (or in blocks past the table) are zero-filled.
template <typename State, int STAGES>
struct TilePipeline : BlockWindow<State::kTile> {
  using T = typename State::Element;
  static constexpr int kTile = State::kTile;
  static constexpr int kRowStride = State::kRowStride;
  static constexpr int kRowBytes = State::kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kCopyBytes = kRowBytes % 16 == 0 ? 16 : (kRowBytes % 8 == 0 ? 8 : 4);
  static constexpr int kCopiesPerRow = kRowBytes / kCopyBytes;
  static constexpr int kCopiesPerTile = kTile * kCopiesPerRow;  // of keys; as many of values
  static constexpr int kCopiesPerLane = (kCopiesPerTile + 31) / 32;
  static constexpr int kTileElems = kTile * kRowStride;
  static constexpr int kWarpElems = STAGES * 2 * kTileElems;  // keys then values, per stage
  static_assert(kRowBytes % 4 == 0, "rows are copied in units of at least 4 bytes");

  const T* key_base;    // this kv head's cache, block 0
  const T* value_base;
  T* stages;            // this warp's shared memory
  unsigned stages_address;  // the same, as a shared-window address
  long long block_stride;

  // The shared memory the warps' stages take up, from the start of the dynamic shared memory.
  static __device__ __forceinline__ unsigned char* stage_space(unsigned char* shared) { return shared; }

  __device__ __forceinline__ void bind(const T* key_cache, const T* value_cache, const TensorMap&, const TensorMap&,
                                       int kv_head, int num_kv_heads, unsigned char* shared, int warp) {
    const long long head_stride = (1LL << this->log2_block_size) * State::kHeadDim;
    key_base = key_cache + kv_head * head_stride;
    value_base = value_cache + kv_head * head_stride;
    block_stride = head_stride * num_kv_heads;
    stages = reinterpret_cast<T*>(shared) + warp * kWarpElems;
    stages_address = shared_address(stages);
  }

  __device__ __forceinline__ const T* keys(int k) const { return stages + (k % STAGES) * 2 * kTileElems; }

  __device__ __forceinline__ void issue(int k) {
    this->enter(k);
    constexpr int kElementBytes = static_cast<int>(sizeof(T));
    const unsigned stage = stages_address + (k % STAGES) * 2 * kTileElems * kElementBytes;
    const int offset_mask = (1 << this->log2_block_size) - 1;
#pragma unroll
    for (int i = 0; i < kCopiesPerLane; ++i) {
      const int copy = this->lane + 32 * i;
      const int token = copy / kCopiesPerRow;
      const int pos = this->tile_start(k) + token;
      const int block = this->block_of(k, pos);
      if (kCopiesPerTile % 32 != 0 && copy >= kCopiesPerTile) continue;
      const int part = (copy % kCopiesPerRow) * (kCopyBytes / kElementBytes);
      const bool is_valid = pos < this->context_len && block >= 0;
      const long long src = is_valid ? block * block_stride + (pos & offset_mask) * State::kHeadDim + part : 0;
      const unsigned dst = stage + (token * kRowStride + part) * kElementBytes;
      copy_async<kCopyBytes>(dst, key_base + src, is_valid ? kCopyBytes : 0);
      copy_async<kCopyBytes>(dst + kTileElems * kElementBytes, value_base + src, is_valid ? kCopyBytes : 0);
    }
  }

  // Issues tiles 0 .. STAGES - 2 of the warp's share of a context of context_len tokens.
  __device__ __forceinline__ void start(int context_len) {
    this->set_context(context_len);
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
      if (k < this->my_tiles) issue(k);
      asm volatile("cp.async.commit_group;");
    }
  }

  // Issues tile k + STAGES - 1 and waits for tile k.
  __device__ __forceinline__ void advance(int k) {
    if (k + STAGES - 1 < this->my_tiles) issue(k + STAGES - 1);
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1));
    __syncwarp();  // every lane's copies of tile k have landed
  }

  __device__ __forceinline__ void finish() const { asm volatile("cp.async.wait_group 0;"); }
};

// One warp's pipeline of tiles staged by the tensor memory accelerator (sm_90): stage k % STAGES holds tile k's
// keys then values, each as 64-dim column halves of 128-byte rows in the 128-byte swizzle (MmaState with
// TMA_STAGED reads them). A tile is one or two boxes of min(TILE, block_size) rows per half, copied by one lane;
// the stage's mbarrier counts their bytes. Boxes of blocks past the table read as zeros (out of bounds); tokens
// past the context are read as stored, and their value rows are zeroed before use (their scores are masked, but
// a stale NaN times a zero probability would still be NaN).
template <typename State, int STAGES>
struct TmaPipeline : BlockWindow<State::kTile> {
  using T = typename State::Element;
  static constexpr int kTile = State::kTile;
  static constexpr int kHalves = State::kHeadDim / 64;
  static constexpr int kTileElems = kTile * State::kHeadDim;
  static constexpr int kTileBytes = kTileElems * static_cast<int>(sizeof(T));
  static constexpr int kWarpBytes = STAGES * 2 * kTileBytes;
  static constexpr int kSwizzleBytes = 1024;  // boxes start on this alignment: the swizzle's 8 rows of 128 bytes
  static_assert(sizeof(T) == 2 && State::kHeadDim % 64 == 0, "rows are 64-dim halves of 128 bytes");
  static_assert(kTile % 8 == 0 && kTileBytes % kSwizzleBytes == 0, "boxes of at least 8 rows, aligned");

  const TensorMap* key_map;
  const TensorMap* value_map;
  const T* stages;
  unsigned stages_address;
  unsigned barriers;  // this warp's STAGES mbarriers, shared-window address
  int kv_head, num_kv_heads;

  static constexpr int kBarrierBytes = 1024;  // at the start of the dynamic shared memory: every warp's barriers
  static_assert(32 * STAGES * 8 <= kBarrierBytes, "room for the barriers of a CTA of up to 32 warps");

  // The warps' stages: after the barriers, aligned for the swizzle. The launcher adds 2 KiB to the stages for
  // both.
  static __device__ __forceinline__ unsigned char* stage_space(unsigned char* shared) {
    const unsigned start = shared_address(shared);
    const unsigned stages = (start + kBarrierBytes + kSwizzleBytes - 1) & ~(kSwizzleBytes - 1);
    return shared + (stages - start);
  }

  __device__ __forceinline__ void bind(const T*, const T*, const TensorMap& key_map_, const TensorMap& value_map_,
                                       int kv_head_, int num_kv_heads_, unsigned char* shared, int warp) {
    key_map = &key_map_;
    value_map = &value_map_;
    kv_head = kv_head_;
    num_kv_heads = num_kv_heads_;
    stages = reinterpret_cast<const T*>(stage_space(shared) + warp * kWarpBytes);
    stages_address = shared_address(stages);
    barriers = shared_address(shared) + warp * STAGES * 8;
  }

  __device__ __forceinline__ const T* keys(int k) const { return stages + (k % STAGES) * 2 * kTileElems; }

  __device__ __forceinline__ void issue(int k) {
    this->enter(k);
    const unsigned stage = stages_address + (k % STAGES) * 2 * kTileBytes;
    const unsigned barrier = barriers + (k % STAGES) * 8;
    if (this->lane == 0) arrive_expecting(barrier, 2 * kTileBytes);
    const int log2_box_rows = min(this->log2_block_size, 31 - __clz(kTile));
#pragma unroll
    for (int box = 0; box < kTile / 8; ++box) {
      if (box << log2_box_rows >= kTile) break;
      const int pos = this->tile_start(k) + (box << log2_box_rows);
      const int block = this->block_of(k, pos);
      const int offset = pos & ((1 << this->log2_block_size) - 1);
      const int row = block >= 0 ? ((block * num_kv_heads + kv_head) << this->log2_block_size) + offset : -kTile;
      if (this->lane == 0) {
#pragma unroll
        for (int half = 0; half < kHalves; ++half) {
          const unsigned dst = stage + (half * kTile + (box << log2_box_rows)) * 128;
          load_box(dst, *key_map, half * 64, row, barrier);
          load_box(dst + kTileBytes, *value_map, half * 64, row, barrier);
        }
      }
    }
  }

  // Initialises the warp's barriers and issues tiles 0 .. STAGES - 2 of its share of a context of context_len
  // tokens.
  __device__ __forceinline__ void start(int context_len) {
    this->set_context(context_len);
    if (this->lane < STAGES) init_barrier(barriers + this->lane * 8);
    fence_barrier_init();
    __syncwarp();
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
      if (k < this->my_tiles) issue(k);
    }
  }

  // Issues tile k + STAGES - 1 and waits for tile k.
  __device__ __forceinline__ void advance(int k) {
    if (k + STAGES - 1 < this->my_tiles) issue(k + STAGES - 1);
    wait_barrier(barriers + (k % STAGES) * 8, (k / STAGES) & 1);
    const int valid = this->context_len - this->tile_start(k);
    if (valid < kTile) {  // the context's last tile: zero the value rows past it
      const unsigned values = stages_address + (k % STAGES) * 2 * kTileBytes + kTileBytes;
      for (int chunk = this->lane; chunk < kTileBytes / 16; chunk += 32) {
        if (chunk / 8 % kTile >= valid) {
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(values + chunk * 16), "r"(0u) : "memory");
        }
      }
    }
    __syncwarp();
  }

  __device__ __forceinline__ void finish() const {}  // every issued tile has been waited for
};

// The pipeline that stages State's tiles in the layout it reads.
template <typename State, int STAGES>
struct PipelineFor {
  using type = TilePipeline<State, STAGES>;
};
template <typename T, int HEAD_DIM, int HEADS, int TILE, int STAGES>
struct PipelineFor<MmaState<T, HEAD_DIM, HEADS, TILE, true>, STAGES> {
  using type = TmaPipeline<MmaState<T, HEAD_DIM, HEADS, TILE, true>, STAGES>;
};

// Merges the warps' results; writes each (head, dim) element of the CTA's HEADS heads as the normalised output
// (one split) or the split's partial result. The elements are spread over all the CTA's threads at once: this
// epilogue is on the critical path of every short CTA.
template <typename T, int HEAD_DIM, int HEADS, int THREADS>
__device__ __forceinline__ void write_heads(const float* merge_acc, const float* merge_stats, T* out_heads,
                                            float* split_acc, float* split_max, float* split_sum,
                                            long long first_slot, int num_splits, float value_scale) {
  constexpr int kWarps = THREADS / 32;
  for (int i = threadIdx.x; i < HEADS * HEAD_DIM; i += THREADS) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float total_max = negative_infinity();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, merge_stats[(w * HEADS + g) * 2]);
    float total = 0.0f, total_sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = scale_from(merge_stats[(w * HEADS + g) * 2], total_max);
      total_sum = fmaf(weight, merge_stats[(w * HEADS + g) * 2 + 1], total_sum);
      total = fmaf(weight, merge_acc[(w * HEADS + g) * HEAD_DIM + d], total);
    }
    total *= value_scale;  // 1 unless the values are FP8
    if (num_splits == 1) {
      out_heads[i] = from_float<T>(total / total_sum);
    } else {
      const long long slot = first_slot + static_cast<long long>(g) * num_splits;
      split_acc[slot * HEAD_DIM + d] = total;
      if (d == 0) {
        split_max[slot] = total_max;
        split_sum[slot] = total_sum;
      }
    }
  }
}

template <typename State, int THREADS, int STAGES, typename T = typename State::Query,
          typename C = typename State::Element>
__global__ void __launch_bounds__(THREADS, State::kThreadsPerSm / THREADS) paged_decode(
    T* __restrict__ out, long long out_row_stride, const T* __restrict__ query, long long query_row_stride,
    const C* __restrict__ key_cache, const C* __restrict__ value_cache, const __grid_constant__ TensorMap key_map,
    const __grid_constant__ TensorMap value_map, const int* __restrict__ block_tables,
    int block_table_stride, int block_table_width, const int* __restrict__ seq_lens,
    const int* __restrict__ query_start_loc, int num_seqs, int rows_by_seq, int num_kv_heads, int group_size,
    int log2_block_size, float scale_log2e, float value_scale, float* __restrict__ split_acc,
    float* __restrict__ split_max, float* __restrict__ split_sum, int num_splits) {
  constexpr int kWarps = THREADS / 32;
  constexpr int HEAD_DIM = State::kHeadDim, HEADS = State::kHeads;
  static_assert(THREADS <= State::kThreadsPerSm, "the state's registers allow no CTA this large");
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int chunks_per_group = group_size / HEADS;
  // blockIdx.x = grid row * head groups + head group: the CTAs of one row's kv heads are launched together, so
  // they read neighbouring parts of the same KV blocks at about the same time.
  const int head_groups = num_kv_heads * chunks_per_group;
  const int grid_row = blockIdx.x / head_groups, head_group = blockIdx.x % head_groups;
  const int kv_head = head_group / chunks_per_group;
  const int first_head = kv_head * group_size + (head_group % chunks_per_group) * HEADS;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  using Pipeline = typename PipelineFor<State, STAGES>::type;
  Pipeline pipeline;
  pipeline.log2_block_size = log2_block_size;
  pipeline.bind(key_cache, value_cache, key_map, value_map, kv_head, num_kv_heads, shared_bytes, warp);
  pipeline.table_width = block_table_width;
  pipeline.first_tile = split * kWarps + warp;
  pipeline.tile_stride = kWarps * num_splits;
  pipeline.lane = lane;
  if (rows_by_seq) pipeline.prefetch_blocks(block_tables, block_table_stride, grid_row);
  RowTask task;
  if (!resolve_row(grid_row, rows_by_seq != 0, num_seqs, seq_lens, query_start_loc, task)) return;
  if (!rows_by_seq) pipeline.prefetch_blocks(block_tables, block_table_stride, task.seq);

  State state;
  state.start(query + task.row * query_row_stride + first_head * HEAD_DIM, lane, scale_log2e);
  pipeline.start(task.context_len);
  for (int k = 0; k < pipeline.my_tiles; ++k) {
    pipeline.advance(k);
    const C* keys = pipeline.keys(k);
    state.consume(keys, keys + Pipeline::kTileElems, task.context_len - pipeline.tile_start(k));
    __syncwarp();  // the stage is refilled by the next iteration's copies
  }
  pipeline.finish();
  state.merge_warp();

  __syncthreads();  // the pipelines' stages become the merge buffer
  float* merge_acc = reinterpret_cast<float*>(Pipeline::stage_space(shared_bytes));  // [warps][HEADS][HEAD_DIM]
  float* merge_stats = merge_acc + kWarps * HEADS * HEAD_DIM;  // [warps][HEADS][max, sum]
  state.publish(merge_acc, merge_stats, warp);
  __syncthreads();
  const int num_q_heads = num_kv_heads * group_size;
  write_heads<T, HEAD_DIM, HEADS, THREADS>(
      merge_acc, merge_stats, out + task.row * out_row_stride + first_head * HEAD_DIM, split_acc, split_max,
      split_sum, (static_cast<long long>(grid_row) * num_q_heads + first_head) * num_splits + split, num_splits,
      value_scale);
}

// Merges the splits of paged_decode: out = sum_i w_i acc_i / sum_i w_i l_i, w_i = 2^(m_i - M), M = max_i m_i over
// the splits that saw a token (l_i > 0). One CTA per (grid row of paged_decode, query head), one thread per
// output element. Each thread folds the splits in batches of kBatch with an online rescale: a batch's loads are
// independent of each other and of the row lookup, so they are in flight together (no barrier, no shared memory).
template <typename T, int HEAD_DIM>
__global__ void paged_decode_reduce(T* __restrict__ out, long long out_row_stride,
                                    const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
                                    int num_seqs, int rows_by_seq, const float* __restrict__ split_acc,
                                    const float* __restrict__ split_max, const float* __restrict__ split_sum,
                                    int num_splits) {
  constexpr int kBatch = 16;
  const int head = blockIdx.y, d = threadIdx.x;
  const long long first_slot = (static_cast<long long>(blockIdx.x) * gridDim.y + head) * num_splits;
  RowTask task;
  const bool is_active = resolve_row(blockIdx.x, rows_by_seq != 0, num_seqs, seq_lens, query_start_loc, task);
  if (d >= HEAD_DIM) return;

  float m = negative_infinity(), l = 0.0f, acc = 0.0f;
  for (int first = 0; first < num_splits; first += kBatch) {
    float batch_m[kBatch], batch_l[kBatch], batch_acc[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const long long slot = first_slot + min(first + i, num_splits - 1);
      batch_m[i] = split_max[slot];
      batch_l[i] = first + i < num_splits ? split_sum[slot] : 0.0f;
      batch_acc[i] = split_acc[slot * HEAD_DIM + d];
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (batch_l[i] > 0.0f) {  // splits that saw no token have max -inf
        const float new_m = fmaxf(m, batch_m[i]);
        const float mine = scale_from(m, new_m), theirs = exp2f(batch_m[i] - new_m);
        acc = acc * mine + batch_acc[i] * theirs;
        l = l * mine + batch_l[i] * theirs;
        m = new_m;
      }
    }
  }
  if (is_active) out[task.row * out_row_stride + head * HEAD_DIM + d] = from_float<T>(acc / l);
}
