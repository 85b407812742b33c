// KV-cache maintenance: writing new tokens into their slots, and copying whole blocks between pools.
//
// KV pool layout: [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]; one layer's key (or value)
// cache is [num_blocks, num_kv_heads, block_size, head_dim]. Data moves as raw bits in units U (uint4 = 16
// bytes where the sizes allow), so one instantiation serves every element type of the same unit size.
#include "kernel_common.cuh"

// One CTA per token: key/value [num_tokens, num_kv_heads, head_dim] (token rows may be strided) go to slot
// slot_mapping[token] = block * block_size + offset; slot -1 is padding and is skipped.
template <typename U>
__global__ void write_kv(const U* __restrict__ key, long long key_token_stride, const U* __restrict__ value,
                         long long value_token_stride, U* __restrict__ key_cache, U* __restrict__ value_cache,
                         const long long* __restrict__ slot_mapping, int num_kv_heads, int head_units,
                         int log2_block_size) {
  begin_dependent_grid();
  const int token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  const long long block = slot >> log2_block_size;
  const long long offset = slot & ((1LL << log2_block_size) - 1);
  const long long block_size = 1LL << log2_block_size;
  for (int i = threadIdx.x; i < num_kv_heads * head_units; i += blockDim.x) {
    const int head = i / head_units, unit = i % head_units;
    const long long dst = ((block * num_kv_heads + head) * block_size + offset) * head_units + unit;
    key_cache[dst] = key[token * key_token_stride + i];
    value_cache[dst] = value[token * value_token_stride + i];
  }
}

// Grid (num_pairs, num_layers * 2): copies block mapping[pair][0] of src into block mapping[pair][1] of dst for
// every (layer, K/V) slab. src and dst are whole pools with their own block counts; either may be pinned host
// memory mapped into the device address space (swap), or both the same device pool (copy-on-write).
template <typename U>
__global__ void copy_blocks(const U* __restrict__ src, U* __restrict__ dst, const long long* __restrict__ mapping,
                            long long src_slab_units, long long dst_slab_units, long long block_units) {
  begin_dependent_grid();
  const long long src_block = mapping[2 * blockIdx.x];
  const long long dst_block = mapping[2 * blockIdx.x + 1];
  const U* from = src + blockIdx.y * src_slab_units + src_block * block_units;
  U* to = dst + blockIdx.y * dst_slab_units + dst_block * block_units;
  for (long long i = threadIdx.x; i < block_units; i += blockDim.x) to[i] = from[i];
}

// write_kv into an FP8 cache: key / k_scale and value / v_scale rounded to e4m3 (saturating). One CTA per token;
// key/value [num_tokens, num_kv_heads, head_dim] of T, token rows strided, VEC elements per load (VEC divides
// head_dim); the caches' rows are head_dim bytes.
template <typename T, int VEC>
__global__ void write_kv_fp8(const T* __restrict__ key, long long key_token_stride, const T* __restrict__ value,
                             long long value_token_stride, fp8_e4m3_t* __restrict__ key_cache,
                             fp8_e4m3_t* __restrict__ value_cache, const long long* __restrict__ slot_mapping,
                             int num_kv_heads, int head_dim, int log2_block_size, float k_scale, float v_scale) {
  begin_dependent_grid();
  const int token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  const long long block = slot >> log2_block_size;
  const long long offset = slot & ((1LL << log2_block_size) - 1);
  const int vecs_per_head = head_dim / VEC;
  for (int i = threadIdx.x; i < num_kv_heads * vecs_per_head; i += blockDim.x) {
    const int head = i / vecs_per_head, element = (i % vecs_per_head) * VEC;
    const long long dst = (((block * num_kv_heads + head) << log2_block_size) + offset) * head_dim + element;
    float k[VEC], v[VEC];
    load_as_float<T, VEC>(key + token * key_token_stride + head * head_dim + element, k);
    load_as_float<T, VEC>(value + token * value_token_stride + head * head_dim + element, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      k[e] = __fdiv_rn(k[e], k_scale);
      v[e] = __fdiv_rn(v[e], v_scale);
    }
    store_from_float<fp8_e4m3_t, VEC>(key_cache + dst, k);
    store_from_float<fp8_e4m3_t, VEC>(value_cache + dst, v);
  }
}

// A decode step's block tables into the graphs' static [rows, max_blocks] table: packed is [num_seqs, width, then
// num_seqs x width block ids], written by the host for each step, so one captured launch serves every step. One CTA
// per table row; rows from num_seqs on and columns from width on keep what they held.
__global__ void spread_block_tables(const int* __restrict__ packed, int* __restrict__ block_tables, int max_blocks) {
  begin_dependent_grid();
  const int row = blockIdx.x;
  const int num_seqs = packed[0], width = packed[1];
  if (row >= num_seqs) return;
  const int* from = packed + 2 + static_cast<long long>(row) * width;
  int* to = block_tables + static_cast<long long>(row) * max_blocks;
  for (int column = threadIdx.x; column < width; column += blockDim.x) to[column] = from[column];
}
