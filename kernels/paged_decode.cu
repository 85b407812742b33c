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
// - MmaState (float16 / bfloat16 queries, head_dim 64 or 128, caches of the query's dtype or FP8): S = Q K^T and
//   O^T = V^T P^T on mma.sync (decode_mma_state.cuh; FP8 fragments are widened in registers). On sm_90 with blocks
//   of at least 8 tokens its tiles are staged by the tensor memory accelerator (TmaPipeline): bulk copies of whole
//   blocks stream faster than 16-byte cp.async.
// - LaneState (any dtype and head size, FP8 caches too): float32 dot products on CUDA cores
//   (decode_lane_state.cuh). A token row of HEAD_DIM elements is covered by LANES lanes, each holding VECS vectors
//   of VEC elements (vector j of lane l is elements [(j * LANES + l) * VEC, +VEC)); a warp computes 32 / LANES
//   tokens at once, each token group (the LANES lanes of one token row) keeping its own softmax until the warp
//   merges them.
//
// KV pool: key_cache / value_cache [num_blocks, num_kv_heads, block_size, HEAD_DIM]; the token at position p
// of sequence s is in block block_tables[s, p / block_size] at offset p % block_size. The pool holds the query's
// dtype, or FP8: e4m3 keys and values, staged as bytes and widened as they are read from the staged tile. Their
// scales never touch the loop: the key scale is folded into scale_log2e by the launcher, and the value scale
// multiplies each CTA's (unnormalised) result, which is linear in the values.
#include "decode_lane_state.cuh"
#include "decode_mma_state.cuh"
#include "decode_pipelines.cuh"

// The pipeline that stages State's tiles in the layout it reads.
template <typename State, int STAGES>
struct PipelineFor {
  using type = TilePipeline<State, STAGES>;
};
template <typename T, int HEAD_DIM, int HEADS, int TILE, typename C, int STAGES>
struct PipelineFor<MmaState<T, HEAD_DIM, HEADS, TILE, true, C>, STAGES> {
  using type = TmaPipeline<MmaState<T, HEAD_DIM, HEADS, TILE, true, C>, STAGES>;
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

  // The kernel before this one (in a step: rotary and KV write) writes the query rows and the K/V of the step's new
  // tokens; the block tables and lengths are the step's inputs. A decode row's one new token is its last, so its
  // tiles wholly before that token start streaming while that kernel ends; the rest wait for it.
  pipeline.start(task.context_len, rows_by_seq ? task.context_len - 1 : 0);
  begin_dependent_grid();
  pipeline.issue_first_tiles(Pipeline::kAllTokens);
  State state;
  state.start(query + task.row * query_row_stride + first_head * HEAD_DIM, lane, scale_log2e);
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
  begin_dependent_grid();
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
