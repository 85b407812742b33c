// Paged attention of single query rows over their paged context (decode, and the generic path for any row).
//
// One CTA per (query row, kv head, group of HEADS query heads of that kv head, split of the context). The query
// heads of a GQA group are processed together, so each K/V byte is read once per CTA. The CTA's context is cut
// into tiles of TILE tokens; warp w takes tiles w, w + WARPS, ... and runs its own STAGES-deep cp.async pipeline
// into its private shared memory, so no block-wide barrier stalls the loads. Each token group (LANES lanes holding
// one token row) keeps an online softmax in float32 over its tokens; token groups and warps are merged at the end
// (log-sum-exp). When the launcher splits the context, each split writes an unnormalised partial result that
// paged_decode_reduce merges. (Merging inside this kernel, by the last split to finish, measured slower: the
// merge code costs the main loop registers and scheduling freedom even when it does not run.)
//
// Lane layout: a token row of HEAD_DIM elements is covered by LANES lanes, each holding VECS vectors of VEC
// elements (vector j of lane l is elements [(j * LANES + l) * VEC, +VEC)); a warp computes 32 / LANES tokens at once.
//
// KV pool: key_cache / value_cache [num_blocks, num_kv_heads, block_size, HEAD_DIM]; the token at position p
// of sequence s is in block block_tables[s, p / block_size] at offset p % block_size.
#include "kernel_common.cuh"

template <typename T, int HEAD_DIM, int VEC, int LANES, int VECS, int HEADS, int THREADS, int TILE, int STAGES>
struct DecodeShape {
  static constexpr int kWarps = THREADS / 32;
  static constexpr int kTokensPerPass = 32 / LANES;
  static constexpr int kPasses = TILE / kTokensPerPass;
  static constexpr int kLaneElems = VEC * VECS;
  static constexpr int kNumVecs = HEAD_DIM / VEC;
  static constexpr int kRowBytes = HEAD_DIM * static_cast<int>(sizeof(T));
  static constexpr int kCopyBytes = kRowBytes % 16 == 0 ? 16 : (kRowBytes % 8 == 0 ? 8 : 4);
  static constexpr int kCopiesPerRow = kRowBytes / kCopyBytes;
  static constexpr int kCopiesPerTile = TILE * kCopiesPerRow;  // of keys; as many of values
  static constexpr int kCopiesPerLane = (kCopiesPerTile + 31) / 32;
  static constexpr int kTileElems = TILE * HEAD_DIM;
  static constexpr int kWarpElems = STAGES * 2 * kTileElems;  // keys then values, per stage
  // Small per-lane state (query, accumulators, a tile's scores) fits 128 registers: ask for 4 resident CTAs.
  static constexpr int kMinCtas = 2 * HEADS * kLaneElems + kPasses * HEADS <= 96 ? 4 : 1;
  static_assert(HEAD_DIM % VEC == 0, "VEC must divide HEAD_DIM");
  static_assert(32 % LANES == 0, "LANES must divide the warp");
  static_assert(LANES * VECS >= kNumVecs, "lanes must cover head_dim");
  static_assert(TILE % kTokensPerPass == 0, "a tile is whole passes");
  static_assert(kRowBytes % 4 == 0, "rows are copied in units of at least 4 bytes");
};

template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src, int src_bytes) {
  unsigned address;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(dst));
  if (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(address), "l"(src), "n"(BYTES),
                 "r"(src_bytes));
  }
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

// exp2(x - m) with the convention that a max of -inf (nothing seen yet) scales everything to 0.
__device__ __forceinline__ float scale_from(float x, float m) {
  return m == negative_infinity() ? 0.0f : exp2f(x - m);
}

// One warp's cp.async pipeline over its tiles k = 0, 1, ... (tile k starts at token (first_tile + k * WARPS) * TILE):
// stage k % STAGES holds the tile's keys then values; block ids are fetched one tile ahead of their copies.
template <typename T, int HEAD_DIM, int TILE, int STAGES, typename S>
struct TilePipeline {
  const int* table;
  const T* key_base;    // this kv head's cache, block 0
  const T* value_base;
  T* stages;            // this warp's shared memory
  long long block_stride;
  int log2_block_size, first_tile, my_tiles, context_len, lane;
  int copy_block[S::kCopiesPerLane];  // block of each token this lane copies in the next tile, -1 past the context

  __device__ __forceinline__ int tile_start(int k) const { return (first_tile + k * S::kWarps) * TILE; }
  __device__ __forceinline__ const T* keys(int k) const { return stages + (k % STAGES) * 2 * S::kTileElems; }

  __device__ __forceinline__ void fetch_blocks(int k) {
#pragma unroll
    for (int i = 0; i < S::kCopiesPerLane; ++i) {
      const int pos = tile_start(k) + (lane + 32 * i) / S::kCopiesPerRow;
      copy_block[i] = (k < my_tiles && pos < context_len) ? table[pos >> log2_block_size] : -1;
    }
  }

  __device__ __forceinline__ void issue(int k) {
    T* stage = stages + (k % STAGES) * 2 * S::kTileElems;
    const int offset_mask = (1 << log2_block_size) - 1;
#pragma unroll
    for (int i = 0; i < S::kCopiesPerLane; ++i) {
      const int copy = lane + 32 * i;
      if (S::kCopiesPerTile % 32 != 0 && copy >= S::kCopiesPerTile) continue;
      const int token = copy / S::kCopiesPerRow;
      const int part = (copy % S::kCopiesPerRow) * (S::kCopyBytes / static_cast<int>(sizeof(T)));
      const bool is_valid = copy_block[i] >= 0;
      const long long src = is_valid
          ? copy_block[i] * block_stride + ((tile_start(k) + token) & offset_mask) * HEAD_DIM + part : 0;
      copy_async<S::kCopyBytes>(stage + token * HEAD_DIM + part, key_base + src, is_valid ? S::kCopyBytes : 0);
      copy_async<S::kCopyBytes>(stage + S::kTileElems + token * HEAD_DIM + part, value_base + src,
                                is_valid ? S::kCopyBytes : 0);
    }
  }

  // Issues tiles 0 .. STAGES - 2; the block ids of tiles 0 .. STAGES - 1 are fetched in one memory round trip.
  __device__ __forceinline__ void start() {
    int first_blocks[STAGES][S::kCopiesPerLane];
#pragma unroll
    for (int k = 0; k < STAGES; ++k) {
      fetch_blocks(k);
#pragma unroll
      for (int i = 0; i < S::kCopiesPerLane; ++i) first_blocks[k][i] = copy_block[i];
    }
#pragma unroll
    for (int k = 0; k < STAGES; ++k) {
#pragma unroll
      for (int i = 0; i < S::kCopiesPerLane; ++i) copy_block[i] = first_blocks[k][i];
      if (k == STAGES - 1) break;
      if (k < my_tiles) issue(k);
      asm volatile("cp.async.commit_group;");
    }
  }

  // Issues tile k + STAGES - 1 and waits for tile k.
  __device__ __forceinline__ void advance(int k) {
    if (k + STAGES - 1 < my_tiles) issue(k + STAGES - 1);
    asm volatile("cp.async.commit_group;");
    fetch_blocks(k + STAGES);
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1));
    __syncwarp();  // every lane's copies of tile k have landed
  }
};

// One token group's online softmax over its tokens for HEADS query heads, in log2 units.
template <typename T, int HEAD_DIM, int VEC, int LANES, int VECS, int HEADS, typename S>
struct HeadGroupState {
  float q[HEADS][S::kLaneElems];  // pre-scaled by softmax scale * log2(e)
  float acc[HEADS][S::kLaneElems];
  float running_max[HEADS], running_sum[HEADS];

  __device__ __forceinline__ void start(const T* query_heads, int lane_in_token, float scale_log2e) {
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
      load_slice<T, HEAD_DIM, VEC, LANES, VECS>(query_heads + g * HEAD_DIM, lane_in_token, q[g]);
      running_max[g] = negative_infinity();
      running_sum[g] = 0.0f;
#pragma unroll
      for (int e = 0; e < S::kLaneElems; ++e) {
        q[g][e] *= scale_log2e;
        acc[g][e] = 0.0f;
      }
    }
  }

  // Scores of the group's tokens in the tile, one rescale per tile, then p * v accumulated.
  __device__ __forceinline__ void consume(const T* keys, const T* values, int tokens_left, int lane_in_token,
                                          int token_in_pass) {
    float score[S::kPasses][HEADS];
#pragma unroll
    for (int pass = 0; pass < S::kPasses; ++pass) {
      const int local = pass * S::kTokensPerPass + token_in_pass;
      float kx[S::kLaneElems];
      load_slice<T, HEAD_DIM, VEC, LANES, VECS>(keys + local * HEAD_DIM, lane_in_token, kx);
#pragma unroll
      for (int g = 0; g < HEADS; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < S::kLaneElems; ++e) dot = fmaf(q[g][e], kx[e], dot);
        if (LANES > 1) dot = xor_sum<1, LANES / 2>(dot);
        score[pass][g] = local < tokens_left ? dot : negative_infinity();
      }
    }
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
      float tile_max = negative_infinity();
#pragma unroll
      for (int pass = 0; pass < S::kPasses; ++pass) tile_max = fmaxf(tile_max, score[pass][g]);
      const float new_max = fmaxf(running_max[g], tile_max);
      const float rescale = scale_from(running_max[g], new_max);
      running_max[g] = new_max;
      running_sum[g] *= rescale;
#pragma unroll
      for (int e = 0; e < S::kLaneElems; ++e) acc[g][e] *= rescale;
#pragma unroll
      for (int pass = 0; pass < S::kPasses; ++pass) {
        score[pass][g] = scale_from(score[pass][g], new_max);  // now the probability numerator
        running_sum[g] += score[pass][g];
      }
    }
#pragma unroll
    for (int pass = 0; pass < S::kPasses; ++pass) {
      float vx[S::kLaneElems];
      load_slice<T, HEAD_DIM, VEC, LANES, VECS>(values + (pass * S::kTokensPerPass + token_in_pass) * HEAD_DIM,
                                                lane_in_token, vx);
#pragma unroll
      for (int g = 0; g < HEADS; ++g) {
#pragma unroll
        for (int e = 0; e < S::kLaneElems; ++e) acc[g][e] = fmaf(score[pass][g], vx[e], acc[g][e]);
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
        for (int e = 0; e < S::kLaneElems; ++e)
          acc[g][e] = acc[g][e] * mine + __shfl_xor_sync(0xffffffffu, acc[g][e], offset) * theirs;
      }
    }
  }

  // Warp `warp`'s result into merge_acc [warps][HEADS][HEAD_DIM] and merge_stats [warps][HEADS][max, sum].
  __device__ __forceinline__ void publish(float* merge_acc, float* merge_stats, int warp, int lane) const {
    if (lane >= LANES) return;  // token group 0 of the warp holds the merged result
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        const int vec = j * LANES + lane;
        if (vec < S::kNumVecs) {
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

// Merges the warps' results of head g; writes the normalised output (one split) or the split's partial result.
template <typename T, int HEAD_DIM, int HEADS, int THREADS, typename S>
__device__ __forceinline__ void write_head(const float* merge_acc, const float* merge_stats, int g, T* out_head,
                                           float* split_acc, float* split_max, float* split_sum, long long slot,
                                           int num_splits) {
  float total_max = negative_infinity();
#pragma unroll
  for (int w = 0; w < S::kWarps; ++w) total_max = fmaxf(total_max, merge_stats[(w * HEADS + g) * 2]);
  float weight[S::kWarps], total_sum = 0.0f;
#pragma unroll
  for (int w = 0; w < S::kWarps; ++w) {
    weight[w] = scale_from(merge_stats[(w * HEADS + g) * 2], total_max);
    total_sum += weight[w] * merge_stats[(w * HEADS + g) * 2 + 1];
  }
  for (int d = threadIdx.x; d < HEAD_DIM; d += THREADS) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) total = fmaf(weight[w], merge_acc[(w * HEADS + g) * HEAD_DIM + d], total);
    if (num_splits == 1) {
      out_head[d] = from_float<T>(total / total_sum);
    } else {
      split_acc[slot * HEAD_DIM + d] = total;
    }
  }
  if (num_splits > 1 && threadIdx.x == 0) {
    split_max[slot] = total_max;
    split_sum[slot] = total_sum;
  }
}

template <typename T, int HEAD_DIM, int VEC, int LANES, int VECS, int HEADS, int THREADS, int TILE, int STAGES,
          typename S = DecodeShape<T, HEAD_DIM, VEC, LANES, VECS, HEADS, THREADS, TILE, STAGES>>
__global__ void __launch_bounds__(THREADS, S::kMinCtas) paged_decode(
    T* __restrict__ out, long long out_row_stride, const T* __restrict__ query, long long query_row_stride,
    const T* __restrict__ key_cache, const T* __restrict__ value_cache, const int* __restrict__ block_tables,
    int block_table_stride, const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    int num_seqs, int rows_by_seq, int num_kv_heads, int group_size, int log2_block_size, float scale_log2e,
    float* __restrict__ split_acc, float* __restrict__ split_max, float* __restrict__ split_sum,
    int num_splits) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  RowTask task;
  if (!resolve_row(blockIdx.x, rows_by_seq != 0, num_seqs, seq_lens, query_start_loc, task)) return;
  const int chunks_per_group = group_size / HEADS;
  const int kv_head = blockIdx.y / chunks_per_group;
  const int first_head = kv_head * group_size + (blockIdx.y % chunks_per_group) * HEADS;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // This split's tiles (a whole number of rounds over the warps), and this warp's share of them.
  const int num_tiles = (task.context_len + TILE - 1) / TILE;
  const int tiles_per_split = ((num_tiles + num_splits - 1) / num_splits + S::kWarps - 1) / S::kWarps * S::kWarps;
  const int first_tile = split * tiles_per_split + warp;
  const int end_tile = min(num_tiles, (split + 1) * tiles_per_split);
  const long long head_stride = (1LL << log2_block_size) * HEAD_DIM;

  TilePipeline<T, HEAD_DIM, TILE, STAGES, S> pipeline;
  pipeline.table = block_tables + static_cast<long long>(task.seq) * block_table_stride;
  pipeline.key_base = key_cache + kv_head * head_stride;
  pipeline.value_base = value_cache + kv_head * head_stride;
  pipeline.stages = reinterpret_cast<T*>(shared_bytes) + warp * S::kWarpElems;
  pipeline.block_stride = head_stride * num_kv_heads;
  pipeline.log2_block_size = log2_block_size;
  pipeline.first_tile = first_tile;
  pipeline.my_tiles = first_tile < end_tile ? (end_tile - first_tile + S::kWarps - 1) / S::kWarps : 0;
  pipeline.context_len = task.context_len;
  pipeline.lane = lane;
  pipeline.start();

  HeadGroupState<T, HEAD_DIM, VEC, LANES, VECS, HEADS, S> state;
  state.start(query + task.row * query_row_stride + first_head * HEAD_DIM, lane % LANES, scale_log2e);
  for (int k = 0; k < pipeline.my_tiles; ++k) {
    pipeline.advance(k);
    const T* keys = pipeline.keys(k);
    state.consume(keys, keys + S::kTileElems, task.context_len - pipeline.tile_start(k), lane % LANES,
                  lane / LANES);
    __syncwarp();  // the stage is refilled by the next iteration's copies
  }
  asm volatile("cp.async.wait_group 0;");
  state.merge_warp();

  __syncthreads();  // the pipelines' shared memory becomes the merge buffer
  float* merge_acc = reinterpret_cast<float*>(shared_bytes);      // [warps][HEADS][HEAD_DIM]
  float* merge_stats = merge_acc + S::kWarps * HEADS * HEAD_DIM;  // [warps][HEADS][max, sum]
  state.publish(merge_acc, merge_stats, warp, lane);
  __syncthreads();
  const int num_q_heads = num_kv_heads * group_size;
#pragma unroll
  for (int g = 0; g < HEADS; ++g) {
    write_head<T, HEAD_DIM, HEADS, THREADS, S>(
        merge_acc, merge_stats, g, out + task.row * out_row_stride + (first_head + g) * HEAD_DIM, split_acc,
        split_max, split_sum, (static_cast<long long>(blockIdx.x) * num_q_heads + first_head + g) * num_splits + split,
        num_splits);
  }
}

// Merges the splits of paged_decode: out = sum_i w_i acc_i / sum_i w_i l_i, w_i = 2^(m_i - M), M = max_i m_i over
// the splits that saw a token (l_i > 0; the others never wrote acc_i). One CTA per (grid row of paged_decode,
// query head); the split statistics are read once, spread over the CTA, and the weights kept in shared memory
// (num_splits floats of dynamic shared memory).
template <typename T, int HEAD_DIM>
__global__ void paged_decode_reduce(T* __restrict__ out, long long out_row_stride,
                                    const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
                                    int num_seqs, int rows_by_seq, const float* __restrict__ split_acc,
                                    const float* __restrict__ split_max, const float* __restrict__ split_sum,
                                    int num_splits) {
  extern __shared__ float weights[];
  __shared__ float warp_partial[32];
  RowTask task;
  if (!resolve_row(blockIdx.x, rows_by_seq != 0, num_seqs, seq_lens, query_start_loc, task)) return;
  const int head = blockIdx.y;
  const long long first_slot = (static_cast<long long>(blockIdx.x) * gridDim.y + head) * num_splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;

  float m = negative_infinity();
  for (int i = threadIdx.x; i < num_splits; i += blockDim.x) {
    const float l = split_sum[first_slot + i], split_m = split_max[first_slot + i];
    weights[i] = l > 0.0f ? split_m : negative_infinity();
    m = fmaxf(m, weights[i]);
  }
  m = warp_max(m);
  if (lane == 0) warp_partial[warp] = m;
  __syncthreads();
  float global_max = negative_infinity();
  for (int w = 0; w < num_warps; ++w) global_max = fmaxf(global_max, warp_partial[w]);
  __syncthreads();  // warp_partial is reused below

  float denominator = 0.0f;
  for (int i = threadIdx.x; i < num_splits; i += blockDim.x) {
    weights[i] = scale_from(weights[i], global_max);
    denominator = fmaf(weights[i], split_sum[first_slot + i], denominator);
  }
  denominator = warp_sum(denominator);
  if (lane == 0) warp_partial[warp] = denominator;
  __syncthreads();
  denominator = 0.0f;
  for (int w = 0; w < num_warps; ++w) denominator += warp_partial[w];

  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float numerator = 0.0f;
#pragma unroll 4
    for (int i = 0; i < num_splits; ++i) {
      if (weights[i] > 0.0f) numerator = fmaf(weights[i], split_acc[(first_slot + i) * HEAD_DIM + d], numerator);
    }
    out[task.row * out_row_stride + head * HEAD_DIM + d] = from_float<T>(numerator / denominator);
  }
}
