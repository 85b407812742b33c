// Fused per-layer element-wise kernels of the decoder: RMSNorm (optionally after the residual add), SiLU-and-mul,
// rotary embedding fused with the paged K/V write, and an FP8 linear's per-token quantization of its input and
// scaling of its unscaled product.
//
// Rounding points. Each kernel reproduces the model's torch code, which stores every intermediate tensor in the
// model dtype T (fp32, fp16 or bf16) and computes each element-wise op in fp32 ("opmath"), rounding once per op:
//   add_rms_norm  residual = T(residual + x)
//   rms_norm      n = T(x * rsqrt(mean(x^2) + eps))  (all fp32 until the store)  then  out = T(weight * n)
//   silu_and_mul  s = T(gate / (1 + exp(-gate)))  then  out = T(s * up)
//   rotary        first' = T(T(first * cos) - T(second * sin)),  second' = T(T(second * cos) + T(first * sin))
// round_to<T> marks each such point. Products and sums use __fmul_rn / __fadd_rn / __fsub_rn, which the compiler
// never contracts into an FMA, so fp32 rounds like torch too. Only the mean of squares differs from torch
// (another summation order), so rms_norm is close to, not equal to, the torch result.
//
// VEC consecutive elements move per load or store; the launcher picks VEC so every row, address and stride is a
// whole number of vectors.
#include "kernel_common.cuh"

// x rounded to T's precision, back in fp32: torch storing an intermediate tensor in T.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// combine(x) over the CTA (identity: combine's neutral value), returned to every thread; blockDim.x is a multiple
// of 32. Call once per kernel.
template <typename Combine>
__device__ __forceinline__ float block_reduce(float x, Combine combine, float identity) {
  __shared__ float warp_results[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_reduce(x, combine);
  if (lane == 0) warp_results[warp] = x;
  __syncthreads();
  return warp_reduce(lane < static_cast<int>(blockDim.x / 32) ? warp_results[lane] : identity, combine);
}

struct Square {
  __device__ __forceinline__ float operator()(float x) const { return x * x; }
};
struct Magnitude {
  __device__ __forceinline__ float operator()(float x) const { return fabsf(x); }
};

// combine of map(x) over every element x of one row of num_vecs vectors, across the CTA (identity: combine's neutral
// value), returned to every thread. Call once per kernel.
template <typename T, int VEC, typename Map, typename Combine>
__device__ __forceinline__ float reduce_row(const T* __restrict__ row, int num_vecs, Map map, Combine combine,
                                            float identity) {
  float partial = identity;
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC];
    load_as_float<T, VEC>(row + i * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) partial = combine(partial, map(v[k]));
  }
  return block_reduce(partial, combine, identity);
}

// out = T(weight * T(row * inv_rms)) over one row of num_vecs vectors. row is not __restrict__: add_rms_norm
// passes the residual it has just written, which must not be read through the read-only (non-coherent) cache.
template <typename T, int VEC>
__device__ __forceinline__ void scale_row(const T* row, const T* __restrict__ weight,
                                          T* __restrict__ out, int num_vecs, float inv_rms) {
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float x[VEC], w[VEC];
    load_as_float<T, VEC>(row + i * VEC, x);
    load_as_float<T, VEC>(weight + i * VEC, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = __fmul_rn(w[k], round_to<T>(__fmul_rn(x[k], inv_rms)));
    store_from_float<T, VEC>(out + i * VEC, x);
  }
}

__device__ __forceinline__ float inverse_rms(float sum_squares, int hidden_size, float eps) {
  return rsqrtf(sum_squares / hidden_size + eps);
}

// One CTA per row: x [num_rows, hidden_size] (rows x_row_stride elements apart) -> out [num_rows, hidden_size].
template <typename T, int VEC>
__global__ void rms_norm(const T* __restrict__ x, long long x_row_stride, const T* __restrict__ weight,
                         T* __restrict__ out, int hidden_size, float eps) {
  const T* row = x + blockIdx.x * x_row_stride;
  const int num_vecs = hidden_size / VEC;
  const float inv_rms = inverse_rms(reduce_row<T, VEC>(row, num_vecs, Square{}, Add{}, 0.0f), hidden_size, eps);
  scale_row<T, VEC>(row, weight, out + blockIdx.x * static_cast<long long>(hidden_size), num_vecs, inv_rms);
}

// One CTA per row: residual <- T(residual + x) in place, then out = rms_norm(residual). Each thread re-reads only
// the vectors it wrote itself, so no barrier is needed between the two passes.
template <typename T, int VEC>
__global__ void add_rms_norm(const T* __restrict__ x, long long x_row_stride, T* __restrict__ residual,
                             long long residual_row_stride, const T* __restrict__ weight, T* __restrict__ out,
                             int hidden_size, float eps) {
  const T* x_row = x + blockIdx.x * x_row_stride;
  T* residual_row = residual + blockIdx.x * residual_row_stride;
  const int num_vecs = hidden_size / VEC;
  float sum_squares = 0.0f;
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float r[VEC], a[VEC];
    load_as_float<T, VEC>(residual_row + i * VEC, r);
    load_as_float<T, VEC>(x_row + i * VEC, a);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      r[k] = round_to<T>(__fadd_rn(r[k], a[k]));
      sum_squares += r[k] * r[k];
    }
    store_from_float<T, VEC>(residual_row + i * VEC, r);
  }
  const float inv_rms = inverse_rms(block_reduce(sum_squares, Add{}, 0.0f), hidden_size, eps);
  scale_row<T, VEC>(residual_row, weight, out + blockIdx.x * static_cast<long long>(hidden_size), num_vecs,
                    inv_rms);
}

// Grid (num_tokens, vector chunks): gate_up [num_tokens, 2 * size] (gate, then up) -> out [num_tokens, size].
template <typename T, int VEC>
__global__ void silu_and_mul(const T* __restrict__ gate_up, T* __restrict__ out, int size) {
  const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (i >= size) return;
  const T* gate_row = gate_up + blockIdx.x * 2LL * size;
  float gate[VEC], up[VEC];
  load_as_float<T, VEC>(gate_row + i, gate);
  load_as_float<T, VEC>(gate_row + size + i, up);
#pragma unroll
  for (int k = 0; k < VEC; ++k) gate[k] = __fmul_rn(round_to<T>(gate[k] / (1.0f + expf(-gate[k]))), up[k]);
  store_from_float<T, VEC>(out + blockIdx.x * static_cast<long long>(size) + i, gate);
}

// Offset of (slot, kv head) in a cache [num_blocks, num_kv_heads, block_size, head_dim].
__device__ __forceinline__ long long cache_offset(long long slot, int kv_head, int num_kv_heads, int head_dim,
                                                  int log2_block_size) {
  const long long block = slot >> log2_block_size, offset = slot & ((1LL << log2_block_size) - 1);
  return (((block * num_kv_heads + kv_head) << log2_block_size) + offset) * head_dim;
}

// x (rotary results, exact T values or to be rounded to T) stored into a cache of C: as they are when C is T; an FP8
// cache stores T(x) / scale, rounded to e4m3.
template <typename T, typename C, int VEC>
__device__ __forceinline__ void store_cache(C* __restrict__ dst, float (&x)[VEC], float scale) {
  if constexpr (!same_type<C, T>::value) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = __fdiv_rn(round_to<T>(x[k]), scale);
  }
  store_from_float<C, VEC>(dst, x);
}

// One CTA per token. Its qkv row holds num_heads q heads, then num_kv_heads k heads, then num_kv_heads v heads,
// head_dim each; cos / sin [num_tokens, head_dim / 2]. Rotated q goes to q_out [num_tokens, num_heads, head_dim];
// rotated k and plain v go to slot slot_mapping[token] of the caches, unless the slot is -1 (padding). Caches of C
// (T, or FP8 holding k / k_scale and v / v_scale).
template <typename T, int VEC, typename C = T>
__global__ void rotary_write_kv(const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                                T* __restrict__ q_out, C* __restrict__ key_cache, C* __restrict__ value_cache,
                                const long long* __restrict__ slot_mapping, int num_heads, int num_kv_heads,
                                int head_dim, int log2_block_size, float k_scale, float v_scale) {
  const int token = blockIdx.x, half = head_dim / 2, half_vecs = half / VEC;
  const long long slot = slot_mapping[token];
  const int num_rotated_heads = slot < 0 ? num_heads : num_heads + num_kv_heads;
  const T* row = qkv + token * static_cast<long long>(num_heads + 2 * num_kv_heads) * head_dim;
  const T* token_cos = cos + token * static_cast<long long>(half);
  const T* token_sin = sin + token * static_cast<long long>(half);
  for (int i = threadIdx.x; i < num_rotated_heads * half_vecs; i += blockDim.x) {
    const int head = i / half_vecs, j = (i % half_vecs) * VEC;
    float first[VEC], second[VEC], c[VEC], s[VEC], out_first[VEC], out_second[VEC];
    load_as_float<T, VEC>(row + head * head_dim + j, first);
    load_as_float<T, VEC>(row + head * head_dim + half + j, second);
    load_as_float<T, VEC>(token_cos + j, c);
    load_as_float<T, VEC>(token_sin + j, s);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out_first[k] = __fsub_rn(round_to<T>(__fmul_rn(first[k], c[k])), round_to<T>(__fmul_rn(second[k], s[k])));
      out_second[k] = __fadd_rn(round_to<T>(__fmul_rn(second[k], c[k])), round_to<T>(__fmul_rn(first[k], s[k])));
    }
    if (head < num_heads) {
      T* dst = q_out + (token * static_cast<long long>(num_heads) + head) * head_dim;
      store_from_float<T, VEC>(dst + j, out_first);
      store_from_float<T, VEC>(dst + half + j, out_second);
    } else {
      C* dst = key_cache + cache_offset(slot, head - num_heads, num_kv_heads, head_dim, log2_block_size);
      store_cache<T, C, VEC>(dst + j, out_first, k_scale);
      store_cache<T, C, VEC>(dst + half + j, out_second, k_scale);
    }
  }
  if (slot < 0) return;
  const T* v_row = row + (num_heads + num_kv_heads) * head_dim;
  for (int i = threadIdx.x; i < num_kv_heads * 2 * half_vecs; i += blockDim.x) {
    const int head = i / (2 * half_vecs), j = (i % (2 * half_vecs)) * VEC;
    C* dst = value_cache + cache_offset(slot, head, num_kv_heads, head_dim, log2_block_size) + j;
    if constexpr (same_type<C, T>::value) {
      *reinterpret_cast<Pack<T, VEC>*>(dst) = load_pack<T, VEC>(v_row + head * head_dim + j);
    } else {
      float v[VEC];
      load_as_float<T, VEC>(v_row + head * head_dim + j, v);
      store_cache<T, C, VEC>(dst, v, v_scale);
    }
  }
}

// One CTA per row: x [num_rows, num_cols] (rows x_row_stride elements apart) -> out e4m3 [num_rows, num_cols]
// (contiguous) and scales [num_rows] float32, as pagedserve.kernels.fp8.quantize_per_row computes them:
// scale = max(amax |row|, 1e-12) / 448 and out = e4m3(x / scale), both true float32 divisions (never a multiply by
// the reciprocal, which rounds differently), the conversion rounding to nearest even and saturating to +-448. The
// second pass re-reads the row, which the first has just brought into L1 / L2.
template <typename T, int VEC>
__global__ void quantize_fp8_per_row(const T* __restrict__ x, long long x_row_stride, fp8_e4m3_t* __restrict__ out,
                                     float* __restrict__ scales, int num_cols) {
  constexpr float kMinScaleNumerator = 1e-12f, kFp8Max = 448.0f;
  const T* row = x + blockIdx.x * x_row_stride;
  const int num_vecs = num_cols / VEC;
  const float amax = reduce_row<T, VEC>(row, num_vecs, Magnitude{}, MaxPropagatingNan{}, 0.0f);
  // Written as torch's clamp(min=...): a NaN amax stays NaN.
  const float scale = __fdiv_rn(amax < kMinScaleNumerator ? kMinScaleNumerator : amax, kFp8Max);
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
  fp8_e4m3_t* out_row = out + blockIdx.x * static_cast<long long>(num_cols);
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC];
    load_as_float<T, VEC>(row + i * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = __fdiv_rn(v[k], scale);
    store_from_float<fp8_e4m3_t, VEC>(out_row + i * VEC, v);
  }
}

// Grid (num_rows, vector chunks): raw bfloat16 [num_rows, num_cols] contiguous (an FP8 product with unit scales) ->
// out T [num_rows, num_cols] contiguous: T(raw * row_scales[m] * col_scales[n] (+ bias[n])), in float32 in that
// order, then rounded to T (raw was rounded to bfloat16 by the product). out may be raw (T bfloat16): each element
// is read, then written, by one thread.
template <typename T, int VEC>
__global__ void scale_fp8_product(const bfloat16_t* raw, const float* __restrict__ row_scales,
                                  const float* __restrict__ col_scales, const T* __restrict__ bias, T* out,
                                  int num_cols) {
  const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (i >= num_cols) return;
  const long long offset = blockIdx.x * static_cast<long long>(num_cols) + i;
  const float row_scale = row_scales[blockIdx.x];
  float v[VEC];
  load_as_float<bfloat16_t, VEC>(raw + offset, v);
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = __fmul_rn(__fmul_rn(v[k], row_scale), col_scales[i + k]);
  if (bias != nullptr) {
    float b[VEC];
    load_as_float<T, VEC>(bias + i, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = __fadd_rn(v[k], b[k]);
  }
  store_from_float<T, VEC>(out + offset, v);
}
