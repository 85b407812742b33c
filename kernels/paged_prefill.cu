// Paged causal attention of query tiles on tensor cores (prefill and chunked prefill, float16 / bfloat16).
//
// One CTA per (sequence, tile of BLOCK_M query rows, query head); each warp owns M_TILES x 16 rows. Key and
// value tiles of BLOCK_N tokens are gathered from the paged pool into shared memory with cp.async (double
// buffered: tile j + 1 loads while tile j computes), S = Q K^T and O += P V run on mma.sync.m16n8k16 with float32
// accumulators, and the softmax is online (float32, log2 units) across key tiles. Query row i of a sequence with
// q_len rows sits at position seq_len - q_len + i and sees key positions 0..that position. Sequences with fewer
// than two query rows are left to paged_decode.
//
// KV pool: key_cache / value_cache [num_blocks, num_kv_heads, block_size, HEAD_DIM] of C; the token at position p
// of sequence s is in block block_tables[s, p / block_size] at offset p % block_size. C is the query's type, or
// fp8_e4m3_t (holding k / k_scale and v / v_scale): then the double-buffered stages hold the e4m3 bytes (half the
// bytes copied) and each tile is widened, exactly, into one 16-bit tile that ldmatrix reads. The scales never
// touch the loop: the launcher folds k_scale into scale_log2e, and v_scale multiplies the output rows (O is linear
// in the values).
#include "tensor_core.cuh"

// 16 bytes global -> shared without passing through registers; src_bytes 0 fills the 16 bytes with zeros.
__device__ __forceinline__ void copy_16_async(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;"); }
template <int PENDING>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING));
}

template <int HEAD_DIM, int BLOCK_M, int BLOCK_N, bool IS_FP8>
struct PrefillShape {
  // 16-bit rows padded by 16 bytes so the 8 rows one ldmatrix reads fall in different banks.
  static constexpr int kRowStride = HEAD_DIM + 8;
  static constexpr int kTileElems = BLOCK_N * kRowStride;
  // Staged (copied) rows: the 16-bit rows themselves, or unpadded e4m3 rows (only the widening pass reads them).
  static constexpr int kStagedRowStride = IS_FP8 ? HEAD_DIM : kRowStride;
  static constexpr int kStagedTileElems = BLOCK_N * kStagedRowStride;
  static constexpr int kChunksPerRow = HEAD_DIM / 8;  // 16-byte pieces of a 16-bit row
  static constexpr int kKSteps = HEAD_DIM / 16;       // mma k steps of Q K^T
  static constexpr int kScoreTiles = BLOCK_N / 8;     // n8 tiles of S
  static constexpr int kOutTiles = HEAD_DIM / 8;      // n8 tiles of O
  static_assert(HEAD_DIM % 16 == 0 && BLOCK_N % 16 == 0, "mma shapes");
};

// Gathers the key and value rows [first, first + ROWS) of one KV head (elements of C) into shared tiles of rows
// ROW_STRIDE elements apart; rows at or past `end` are zero-filled (their addresses are never dereferenced). Each
// thread looks up the blocks of all its rows before its first copy, so that the lookups wait on memory once, not
// once a copy (a lookup in a branch before each copy left the kernel stalled on them); keys and values share them.
template <typename C, int HEAD_DIM, int ROW_STRIDE, int ROWS, int THREADS>
__device__ __forceinline__ void gather_kv_async(C* k_tile, C* v_tile, const C* __restrict__ key_base,
                                                const C* __restrict__ value_base, const int* __restrict__ table,
                                                int first, int end, int log2_block_size, long long block_stride) {
  constexpr int kChunkElems = 16 / sizeof(C);
  constexpr int kChunks = HEAD_DIM / kChunkElems;
  constexpr int kSteps = (ROWS * kChunks + THREADS - 1) / THREADS;
  const int offset_mask = (1 << log2_block_size) - 1;
  int block[kSteps];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {  // rows past `end` look up end - 1's block, an entry of the table
    const int pos = min(first + static_cast<int>((threadIdx.x + s * THREADS) / kChunks), end - 1);
    block[s] = table[pos >> log2_block_size];
  }
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int i = threadIdx.x + s * THREADS;
    if (ROWS * kChunks % THREADS == 0 || i < ROWS * kChunks) {
      const int row = i / kChunks, chunk = i % kChunks;
      const int pos = first + row;
      const long long offset = block[s] * block_stride + (pos & offset_mask) * HEAD_DIM + chunk * kChunkElems;
      const int src_bytes = pos < end ? 16 : 0;
      copy_16_async(k_tile + row * ROW_STRIDE + chunk * kChunkElems, key_base + offset, src_bytes);
      copy_16_async(v_tile + row * ROW_STRIDE + chunk * kChunkElems, value_base + offset, src_bytes);
    }
  }
}

// Two e4m3 values (the low byte first) as one register of two T, exactly: every e4m3 value is a float16 and a
// bfloat16 value.
template <typename T>
__device__ __forceinline__ unsigned widen_e4m3x2(unsigned short pair) {
  const unsigned halves = e4m3x2_to_half2(pair);
  if constexpr (same_type<T, half_t>::value) {
    return halves;
  } else {
    return Mma<T>::pack(to_float(half_t{static_cast<unsigned short>(halves & 0xffffu)}),
                        to_float(half_t{static_cast<unsigned short>(halves >> 16)}));
  }
}

// Widens a staged tile of e4m3 rows (HEAD_DIM bytes apart) into the padded 16-bit tile ldmatrix reads, 8 elements
// (8 bytes in, 16 out) per step: a quarter warp's stores then fill 128 contiguous bytes.
template <typename T, int HEAD_DIM, int ROWS, int THREADS>
__device__ __forceinline__ void widen_tile(T* __restrict__ wide, const fp8_e4m3_t* __restrict__ staged) {
  constexpr int kChunks = HEAD_DIM / 8;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
    const int row = i / kChunks, chunk = i % kChunks;
    const uint2 bytes = *reinterpret_cast<const uint2*>(staged + row * HEAD_DIM + chunk * 8);
    uint4 elements;
    elements.x = widen_e4m3x2<T>(static_cast<unsigned short>(bytes.x & 0xffffu));
    elements.y = widen_e4m3x2<T>(static_cast<unsigned short>(bytes.x >> 16));
    elements.z = widen_e4m3x2<T>(static_cast<unsigned short>(bytes.y & 0xffffu));
    elements.w = widen_e4m3x2<T>(static_cast<unsigned short>(bytes.y >> 16));
    *reinterpret_cast<uint4*>(wide + row * (HEAD_DIM + 8) + chunk * 8) = elements;
  }
}

// Tiles are numbered without a prefix sum over the batch: sequence s owns the grid indices
//   [v(s), v(s) + ceil(q_len_s / tile_rows)),  v(s) = s + query_start_loc[s] / tile_rows,
// which never overlap because v(s + 1) - v(s) >= 1 + floor(q_len_s / tile_rows). The grid's y has
// num_seqs + ceil(num_tokens / tile_rows) indices; the few left over exit at once. Within a sequence the last query
// tile (which sees the most keys) gets the lowest index. The tile index is the grid's y and the head its x: CUDA
// does not promise an order, but the hardware is seen to dispatch x first, so every head of a tile goes out before
// the next tile and each sequence's heaviest CTAs start first, its light ones late (sequences stay in batch order).
// With the tile on x, a grid of under two waves (a short step's) ended on whole heads of heavy tiles.
// Returns false for unused indices and for sequences with fewer than two query rows.
__device__ __forceinline__ bool resolve_tile(int index, int num_seqs, const int* __restrict__ query_start_loc,
                                             int tile_rows, int& seq, int& tile) {
  int lo = 0, hi = num_seqs - 1;  // largest seq with v(seq) <= index
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (mid + query_start_loc[mid] / tile_rows <= index) lo = mid; else hi = mid - 1;
  }
  const int q_len = query_start_loc[lo + 1] - query_start_loc[lo];
  const int num_tiles = (q_len + tile_rows - 1) / tile_rows;
  const int local = index - (lo + query_start_loc[lo] / tile_rows);
  if (q_len < 2 || local < 0 || local >= num_tiles) return false;
  seq = lo;
  tile = num_tiles - 1 - local;
  return true;
}

// Online softmax of one key tile for a warp's M_TILES x 16 rows (accumulator layout of mma.m16n8): masks keys past
// each row's position (when needs_mask), rescales O and the row sums to the new row maxima, and packs
// P = 2^((S - max) * scale_log2e) as the A operand of O += P V. The maxima are kept in the scores' own units (the
// scale is positive), so that each probability takes one fused multiply-add and one exp2.
template <typename T, int M_TILES, int SCORE_TILES, int OUT_TILES>
__device__ __forceinline__ void online_softmax(float (&s_acc)[M_TILES][SCORE_TILES][4],
                                               float (&o_acc)[M_TILES][OUT_TILES][4], float (&row_max)[M_TILES][2],
                                               float (&row_sum)[M_TILES][2],
                                               unsigned (&p_frag)[M_TILES][SCORE_TILES / 2][4], int tile_start,
                                               int warp_first_pos, bool needs_mask, float scale_log2e) {
  const int lane = threadIdx.x % 32;
  const int quad_row = lane / 4, quad_col = 2 * (lane % 4);
#pragma unroll
  for (int m = 0; m < M_TILES; ++m) {
    float tile_max[2] = {negative_infinity(), negative_infinity()};
#pragma unroll
    for (int n = 0; n < SCORE_TILES; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (needs_mask) {
          const int key_pos = tile_start + n * 8 + quad_col + (e & 1);
          const int row_pos = warp_first_pos + m * 16 + quad_row + (e / 2) * 8;
          if (key_pos > row_pos) s_acc[m][n][e] = negative_infinity();
        }
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s_acc[m][n][e]);
      }
    }
    float rescale[2], max_term[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[m][r], tile_max[r]);
      // A row whose keys are all masked so far keeps max -inf; subtracting 0 then keeps exp2 at 0, not NaN.
      const float safe_max = new_max == negative_infinity() ? 0.0f : new_max;
      rescale[r] = exp2_flushed((row_max[m][r] - safe_max) * scale_log2e);
      max_term[r] = -safe_max * scale_log2e;
      row_max[m][r] = new_max;
      row_sum[m][r] *= rescale[r];
    }
#pragma unroll
    for (int n = 0; n < OUT_TILES; ++n) {
      o_acc[m][n][0] *= rescale[0];
      o_acc[m][n][1] *= rescale[0];
      o_acc[m][n][2] *= rescale[1];
      o_acc[m][n][3] *= rescale[1];
    }
#pragma unroll
    for (int n = 0; n < SCORE_TILES; ++n) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = exp2_flushed(fmaf(s_acc[m][n][e], scale_log2e, max_term[e / 2]));
        row_sum[m][e / 2] += p[e];
      }
      p_frag[m][n / 2][(n % 2) * 2 + 0] = Mma<T>::pack(p[0], p[1]);
      p_frag[m][n / 2][(n % 2) * 2 + 1] = Mma<T>::pack(p[2], p[3]);
    }
  }
}

// Writes a warp's normalised output rows (those below num_rows) from the mma.m16n8 accumulator layout, times
// value_scale.
template <typename T, int M_TILES, int OUT_TILES, int HEAD_DIM>
__device__ __forceinline__ void store_rows(const float (&o_acc)[M_TILES][OUT_TILES][4],
                                           const float (&row_sum)[M_TILES][2], T* out_rows, long long out_row_stride,
                                           int warp_first_row, int num_rows, float value_scale) {
  const int lane = threadIdx.x % 32;
  const int quad_row = lane / 4, quad_col = 2 * (lane % 4);
#pragma unroll
  for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[m][r];  // spread over the 4 lanes of the row's quad
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int row = warp_first_row + m * 16 + quad_row + r * 8;
      if (row >= num_rows) continue;
      const float inverse = value_scale / sum;
      T* dst = out_rows + row * out_row_stride + quad_col;
#pragma unroll
      for (int n = 0; n < OUT_TILES; ++n) {
        const float values[2] = {o_acc[m][n][2 * r] * inverse, o_acc[m][n][2 * r + 1] * inverse};
        store_from_float<T, 2>(dst + n * 8, values);
      }
    }
  }
}

// scale_log2e: the softmax scale times log2(e), and times k_scale for FP8 caches; value_scale: v_scale for FP8
// caches, else 1. MIN_CTAS: CTAs an SM must hold at once, which caps the registers a thread (spilling past the cap).
template <typename T, int HEAD_DIM, int M_TILES, int BLOCK_N, int THREADS, typename C = T, int MIN_CTAS = 1>
__global__ void __launch_bounds__(THREADS, MIN_CTAS) paged_prefill(
    T* __restrict__ out, long long out_row_stride, const T* __restrict__ query, long long query_row_stride,
    const C* __restrict__ key_cache, const C* __restrict__ value_cache, const int* __restrict__ block_tables,
    int block_table_stride, const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    int num_seqs, int num_kv_heads, int group_size, int log2_block_size, float scale_log2e, float value_scale) {
  begin_dependent_grid();
  // Each warp owns M_TILES x 16 query rows, so every key / value fragment read from shared memory feeds
  // M_TILES mma instructions.
  constexpr int BLOCK_M = 16 * M_TILES * (THREADS / 32);
  constexpr bool kIsFp8 = same_type<C, fp8_e4m3_t>::value;
  static_assert(kIsFp8 || same_type<C, T>::value, "the cache holds the query's type or e4m3");
  using S = PrefillShape<HEAD_DIM, BLOCK_M, BLOCK_N, kIsFp8>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  // 16-bit caches: the staged tiles are the ones ldmatrix reads. FP8: one widened key and value tile follows
  // the query tile, then the staged e4m3 tiles.
  T* q_tile = reinterpret_cast<T*>(shared_bytes);                   // [BLOCK_M][kRowStride]
  T* k_wide = q_tile + BLOCK_M * S::kRowStride;                     // FP8: [BLOCK_N][kRowStride]
  T* v_wide = k_wide + S::kTileElems;                               // FP8: [BLOCK_N][kRowStride]
  C* k_stages = reinterpret_cast<C*>(kIsFp8 ? v_wide + S::kTileElems : k_wide);  // [2][BLOCK_N][kStagedRowStride]
  C* v_stages = k_stages + 2 * S::kStagedTileElems;                 // [2][BLOCK_N][kStagedRowStride]

  int seq, tile;
  if (!resolve_tile(blockIdx.y, num_seqs, query_start_loc, BLOCK_M, seq, tile)) return;
  const int q_start = query_start_loc[seq];
  const int q_len = query_start_loc[seq + 1] - q_start;
  const int head = blockIdx.x;
  const int kv_head = head / group_size;
  const int first_row = tile * BLOCK_M;
  const int num_rows = min(BLOCK_M, q_len - first_row);
  const int first_pos = seq_lens[seq] - q_len + first_row;  // position of the tile's first query row
  const int kv_end = first_pos + num_rows;                     // keys the tile's last row can see
  const int num_kv_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;

  const int* table = block_tables + static_cast<long long>(seq) * block_table_stride;
  const long long head_stride = static_cast<long long>(1 << log2_block_size) * HEAD_DIM;
  const long long block_stride = head_stride * num_kv_heads;
  const C* key_base = key_cache + kv_head * head_stride;
  const C* value_base = value_cache + kv_head * head_stride;

  for (int i = threadIdx.x; i < BLOCK_M * S::kChunksPerRow; i += THREADS) {
    const int row = i / S::kChunksPerRow, chunk = i % S::kChunksPerRow;
    const bool is_row = row < num_rows;
    const T* src = query + (q_start + (is_row ? first_row + row : 0)) * query_row_stride + head * HEAD_DIM + chunk * 8;
    copy_16_async(q_tile + row * S::kRowStride + chunk * 8, src, is_row ? 16 : 0);
  }
  gather_kv_async<C, HEAD_DIM, S::kStagedRowStride, BLOCK_N, THREADS>(k_stages, v_stages, key_base, value_base, table,
                                                                     0, kv_end, log2_block_size, block_stride);
  commit_async();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_first_row = warp * 16 * M_TILES;
  // Accumulator fragment element e of m-tile m is row warp_first_row + m * 16 + quad_row + (e / 2) * 8.
  float o_acc[M_TILES][S::kOutTiles][4];
  float row_max[M_TILES][2], row_sum[M_TILES][2];
#pragma unroll
  for (int m = 0; m < M_TILES; ++m) {
    row_max[m][0] = row_max[m][1] = negative_infinity();
    row_sum[m][0] = row_sum[m][1] = 0.0f;
#pragma unroll
    for (int n = 0; n < S::kOutTiles; ++n) o_acc[m][n][0] = o_acc[m][n][1] = o_acc[m][n][2] = o_acc[m][n][3] = 0.0f;
  }

  for (int j = 0; j < num_kv_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < num_kv_tiles) {
      gather_kv_async<C, HEAD_DIM, S::kStagedRowStride, BLOCK_N, THREADS>(
          k_stages + (stage ^ 1) * S::kStagedTileElems, v_stages + (stage ^ 1) * S::kStagedTileElems, key_base,
          value_base, table, (j + 1) * BLOCK_N, kv_end, log2_block_size, block_stride);
    }
    commit_async();
    wait_async<1>();  // everything but the tile just issued has landed
    __syncthreads();
    const T* k_tile;
    const T* v_tile;
    if constexpr (kIsFp8) {
      widen_tile<T, HEAD_DIM, BLOCK_N, THREADS>(k_wide, k_stages + stage * S::kStagedTileElems);
      widen_tile<T, HEAD_DIM, BLOCK_N, THREADS>(v_wide, v_stages + stage * S::kStagedTileElems);
      __syncthreads();
      k_tile = k_wide;
      v_tile = v_wide;
    } else {
      k_tile = k_stages + stage * S::kStagedTileElems;
      v_tile = v_stages + stage * S::kStagedTileElems;
    }

    // S = Q K^T for this warp's rows and BLOCK_N keys.
    float s_acc[M_TILES][S::kScoreTiles][4];
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
      for (int n = 0; n < S::kScoreTiles; ++n) s_acc[m][n][0] = s_acc[m][n][1] = s_acc[m][n][2] = s_acc[m][n][3] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < S::kKSteps; ++k) {
      unsigned q_frag[M_TILES][4];
#pragma unroll
      for (int m = 0; m < M_TILES; ++m)
        load_matrix_x4(q_frag[m], q_tile + (warp_first_row + m * 16 + lane % 16) * S::kRowStride + k * 16 +
                                      (lane / 16) * 8);
#pragma unroll
      for (int n = 0; n < S::kScoreTiles; n += 2) {
        unsigned b[4];  // key rows of n8 tiles n and n + 1, columns k*16 .. k*16 + 15
        load_matrix_x4(b, k_tile + (n * 8 + (lane / 16) * 8 + lane % 8) * S::kRowStride + k * 16 +
                              ((lane / 8) % 2) * 8);
#pragma unroll
        for (int m = 0; m < M_TILES; ++m) {
          Mma<T>::k16(s_acc[m][n], q_frag[m], b[0], b[1]);
          Mma<T>::k16(s_acc[m][n + 1], q_frag[m], b[2], b[3]);
        }
      }
    }

    // Causal mask (only tiles reaching past the warp's first position need it), then the online softmax.
    const int tile_start = j * BLOCK_N;
    unsigned p_frag[M_TILES][S::kScoreTiles / 2][4];  // P as the A operand of O += P V, k steps of 16 keys
    online_softmax<T, M_TILES, S::kScoreTiles, S::kOutTiles>(
        s_acc, o_acc, row_max, row_sum, p_frag, tile_start, first_pos + warp_first_row,
        tile_start + BLOCK_N - 1 > first_pos + warp_first_row, scale_log2e);

    // O += P V: value rows are the k dimension, read transposed.
#pragma unroll
    for (int k = 0; k < S::kScoreTiles / 2; ++k) {
#pragma unroll
      for (int n = 0; n < S::kOutTiles; n += 2) {
        unsigned b[4];
        load_matrix_x4_transposed(b, v_tile + (k * 16 + lane % 8 + ((lane / 8) % 2) * 8) * S::kRowStride +
                                         n * 8 + (lane / 16) * 8);
#pragma unroll
        for (int m = 0; m < M_TILES; ++m) {
          Mma<T>::k16(o_acc[m][n], p_frag[m][k], b[0], b[1]);
          Mma<T>::k16(o_acc[m][n + 1], p_frag[m][k], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage (and an FP8 cache's widened tiles) is overwritten in the next iteration
  }

  store_rows<T, M_TILES, S::kOutTiles, HEAD_DIM>(o_acc, row_sum, out + (q_start + first_row) * out_row_stride +
                                                  head * HEAD_DIM, out_row_stride, warp_first_row, num_rows,
                                                  value_scale);
}
