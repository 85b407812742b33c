// Structured output's token masks on the logits: bit t of a row's mask (bit t % 32 of int32 word t / 32) set when the
// row's grammar allows token t next.
//   apply_token_masks  logits[r, t] = -inf where the bit is clear, in place (the sampled rows' masked logits);
//   masked_argmax      the first index of the largest logit of each row with the clear-bit tokens taken as -inf,
//                      the logits unchanged (a greedy batch's tokens: no copy, no separate argmax). Without masks it
//                      is the plain argmax of every greedy batch, read in the logits' own dtype (no float32 copy).
// Both equal torch's masked_fill(-inf) then argmax, ties and NaN included (torch takes a NaN as the largest value).
// masked_argmax can also write each row's token where the next step reads it (kept[kept_index[row]]), so that queueing
// a sampling needs no separate scatter.
// VEC consecutive logits move per load; the launcher picks VEC so every row and address is a whole number of vectors.
#include "kernel_common.cuh"

__device__ __forceinline__ bool is_allowed(const int* __restrict__ mask_row, int token) {
  return (static_cast<unsigned>(mask_row[token >> 5]) >> (token & 31)) & 1u;
}

// grid (rows, ceil(vocab_size / blockDim.x)): one thread per logit.
__global__ void apply_token_masks(float* __restrict__ logits, const int* __restrict__ masks, int vocab_size,
                                  long long logits_row_stride, int mask_words) {
  begin_dependent_grid();
  const int token = blockIdx.y * blockDim.x + threadIdx.x;
  if (token >= vocab_size) return;
  const int row = blockIdx.x;
  if (!is_allowed(masks + static_cast<long long>(row) * mask_words, token)) {
    logits[row * logits_row_stride + token] = negative_infinity();
  }
}

// Whether (value, index) comes before (best, best_index) in argmax order: larger first, NaN largest, and the first
// index among equals.
__device__ __forceinline__ bool precedes(float value, int index, float best, int best_index) {
  const bool value_nan = value != value, best_nan = best != best;
  if (value_nan != best_nan) return value_nan;
  if (value_nan || value == best) return index < best_index;
  return value > best;
}

// The (best, best_index) of a warp's lanes, in every lane.
__device__ __forceinline__ void warp_argmax(float& best, int& best_index) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
    if (precedes(other, other_index, best, best_index)) best = other, best_index = other_index;
  }
}

// grid (rows, splits): CTA (row, split) reads the split-th of `splits` equal runs of the row's vectors; blockDim.x a
// multiple of 32, at most 1024. masks null: every token allowed. Each thread has UNROLL vectors in flight before it
// compares any: a row of a large vocabulary is a few such rounds. With one split the CTA writes the row's token; with
// several (too few rows to fill the device), the run's best value and its index go to split_best / split_index
// [row * splits + split], and argmax_of_splits picks the row's token from them. kept null: tokens only.
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) masked_argmax(const T* __restrict__ logits, const int* __restrict__ masks,
                              long long* __restrict__ tokens, int vocab_size, long long logits_row_stride,
                              int mask_words, float* __restrict__ split_best, int* __restrict__ split_index,
                              long long* __restrict__ kept, const long long* __restrict__ kept_index) {
  begin_dependent_grid();
  constexpr int UNROLL = 4;
  const int row = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int run_vectors = ((vocab_size + VEC - 1) / VEC + splits - 1) / splits;
  const int run_start = split * run_vectors * VEC;
  const int run_end = min(vocab_size, run_start + run_vectors * VEC);
  const T* __restrict__ row_logits = logits + row * logits_row_stride;
  const int* __restrict__ mask_row = masks == nullptr ? nullptr : masks + static_cast<long long>(row) * mask_words;
  float best = negative_infinity();
  int best_index = vocab_size;  // after every real index: the first -inf (masked or not) replaces it
  const int stride = blockDim.x * VEC;
  for (int base = run_start + threadIdx.x * VEC; base < run_end; base += UNROLL * stride) {
    float values[UNROLL][VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int first = base + u * stride;
      if (first < run_end) load_as_float<T, VEC>(row_logits + first, values[u]);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int first = base + u * stride;
      if (first >= run_end) break;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const bool allowed = mask_row == nullptr || is_allowed(mask_row, first + k);
        const float value = allowed ? values[u][k] : negative_infinity();
        if (precedes(value, first + k, best, best_index)) best = value, best_index = first + k;
      }
    }
  }
  warp_argmax(best, best_index);
  __shared__ float warp_best[32];
  __shared__ int warp_best_index[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_best[warp] = best, warp_best_index[warp] = best_index;
  __syncthreads();
  if (warp != 0) return;
  const int num_warps = blockDim.x / 32;
  best = lane < num_warps ? warp_best[lane] : negative_infinity();
  best_index = lane < num_warps ? warp_best_index[lane] : vocab_size;
  warp_argmax(best, best_index);
  if (lane != 0) return;
  if (splits == 1) {
    tokens[row] = best_index;
    if (kept != nullptr) kept[kept_index[row]] = best_index;
  } else {
    split_best[row * splits + split] = best;
    split_index[row * splits + split] = best_index;
  }
}

// grid (rows), one warp a row: the row's token from masked_argmax's bests of its `splits` runs, which run in index
// order, so the argmax order over them is that over the whole row.
__global__ void __launch_bounds__(32) argmax_of_splits(const float* __restrict__ split_best,
                                                       const int* __restrict__ split_index,
                                                       long long* __restrict__ tokens, int splits,
                                                       long long* __restrict__ kept,
                                                       const long long* __restrict__ kept_index) {
  begin_dependent_grid();
  const int row = blockIdx.x, lane = threadIdx.x;
  float best = negative_infinity();
  int best_index = 0x7fffffff;  // after every run's index
  for (int split = lane; split < splits; split += 32) {
    const int slot = row * splits + split;
    if (precedes(split_best[slot], split_index[slot], best, best_index)) {
      best = split_best[slot], best_index = split_index[slot];
    }
  }
  warp_argmax(best, best_index);
  if (lane != 0) return;
  tokens[row] = best_index;
  if (kept != nullptr) kept[kept_index[row]] = best_index;
}
