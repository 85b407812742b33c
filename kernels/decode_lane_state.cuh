// CUDA-core math of paged_decode's warps over staged K/V tiles, for any dtype and head size (see paged_decode.cu).
#pragma once

#include "decode_softmax.cuh"

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

  // Where a staging copy of row `row` starting at byte `byte` goes: rows of HEAD_DIM elements, unpadded.
  static __device__ __forceinline__ unsigned staged_address(unsigned tile, int row, int byte) {
    return tile + row * kRowStride * static_cast<int>(sizeof(C)) + byte;
  }
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
