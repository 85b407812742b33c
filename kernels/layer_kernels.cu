// Fused per-layer element-wise kernels of the decoder: RMSNorm (optionally after the residual add), SiLU-and-mul,
// rotary embedding fused with the paged K/V write, and an FP8 linear's per-token quantization of its input and
// scaling of its unscaled product. The norms and SiLU-and-mul also come as *_fp8 kernels that quantize their output
// per row for the FP8 linear reading it: bit for bit quantize_fp8_per_row of the plain kernel's output, in one pass
// over memory instead of two.
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
//
// The *_fp8 kernels and quantize_fp8_per_row hold a row in registers, VPT vectors a thread: the launcher gives them
// the plain norm's thread count (so each thread sums the same vectors in the same order as there, and the sums of
// squares agree bit for bit) and the fewest VPT for which threads * VPT covers the row. At most MAX_ROW_THREADS
// threads (__launch_bounds__: the compiler spills registers rather than let a launch fail). silu_and_mul_fp8_staged
// stages its row in shared memory instead.
#include "kernel_common.cuh"

constexpr int kMaxRowThreads = 1024;  // layer_kernels.py MAX_ROW_THREADS

// x rounded to T's precision, back in fp32: torch storing an intermediate tensor in T.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// combine(x) over the CTA (identity: combine's neutral value), returned to every thread; blockDim.x is a multiple
// of 32. Call once per kernel with each Combine: each Combine type has its own warp_results, which a second call
// with the same one would overwrite while a warp may still read them.
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

// combine of map(x) over every element x of one row of num_vecs vectors, across the CTA (identity: combine's neutral
// value), returned to every thread.
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

__device__ __forceinline__ float inverse_rms(float sum_squares, int hidden_size, float eps) {
  return rsqrtf(sum_squares / hidden_size + eps);
}

// T(w * T(x * inv_rms)) in float32: one normed element.
template <typename T>
__device__ __forceinline__ float normed(float x, float w, float inv_rms) {
  return round_to<T>(__fmul_rn(w, round_to<T>(__fmul_rn(x, inv_rms))));
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
    for (int k = 0; k < VEC; ++k) x[k] = normed<T>(x[k], w[k], inv_rms);
    store_from_float<T, VEC>(out + i * VEC, x);
  }
}

// f(j, i) for each vector i = threadIdx.x + j * blockDim.x (j < VPT) of a row of num_vecs vectors: the vectors a
// thread holds in registers when its CTA keeps a whole row there (the *_fp8 kernels and quantize_fp8_per_row). The
// launch must give blockDim.x * VPT >= num_vecs.
template <int VPT, typename F>
__device__ __forceinline__ void for_own_vectors(int num_vecs, F f) {
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < num_vecs) f(j, i);
  }
}

template <int VEC>
__device__ __forceinline__ float vector_amax(float amax, const float (&v)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) amax = MaxPropagatingNan{}(amax, fabsf(v[k]));
  return amax;
}

// The row's scale from each thread's share of its amax |row| (see store_row_fp8), stored into *scale by thread 0;
// returns its inverse. Its reduction ends with a barrier, so shared memory written before it is visible to every
// thread after it.
__device__ __forceinline__ float fp8_row_inverse_scale(float amax, float* __restrict__ scale) {
  constexpr float kMinScaleNumerator = 1e-12f, kFp8Max = 448.0f;
  amax = block_reduce(amax, MaxPropagatingNan{}, 0.0f);
  // Written as torch's clamp(min=...): a NaN amax stays NaN.
  const float row_scale = __fdiv_rn(amax < kMinScaleNumerator ? kMinScaleNumerator : amax, kFp8Max);
  if (threadIdx.x == 0) *scale = row_scale;
  return __fdiv_rn(1.0f, row_scale);
}

// e4m3(v * inverse) into dst: the multiply rounded as a float32 product, the conversion to nearest even,
// saturating to +-448.
template <int VEC>
__device__ __forceinline__ void store_vector_fp8(float (&v)[VEC], float inverse, fp8_e4m3_t* __restrict__ dst) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = __fmul_rn(v[k], inverse);
  store_from_float<fp8_e4m3_t, VEC>(dst, v);
}

// A row held in registers by the CTA (v[j]: this thread's vector threadIdx.x + j * blockDim.x, in float32), stored
// as quantize_fp8_per_row stores it: scale = max(amax |row|, 1e-12) / 448 into *scale, its inverse 1 / scale, both
// true float32 divisions, and out_row = e4m3(row * inverse), the conversion rounding to nearest even and saturating
// to +-448. A multiply a value, not a division: 14-16 % less time for these kernels at 2,048 rows (fp8.py says how
// close to the division it is).
template <int VEC, int VPT>
__device__ __forceinline__ void store_row_fp8(float (&v)[VPT][VEC], int num_vecs, fp8_e4m3_t* __restrict__ out_row,
                                              float* __restrict__ scale) {
  float amax = 0.0f;
  for_own_vectors<VPT>(num_vecs, [&](int j, int) { amax = vector_amax<VEC>(amax, v[j]); });
  const float inverse = fp8_row_inverse_scale(amax, scale);
  for_own_vectors<VPT>(num_vecs, [&](int j, int i) { store_vector_fp8<VEC>(v[j], inverse, out_row + i * VEC); });
}

// v[j] <- T(weight * T(v[j] * inv_rms)) for this thread's vectors of a row held in registers.
template <typename T, int VEC, int VPT>
__device__ __forceinline__ void scale_own_vectors(float (&v)[VPT][VEC], const T* __restrict__ weight, int num_vecs,
                                                  float inv_rms) {
  for_own_vectors<VPT>(num_vecs, [&](int j, int i) {
    float w[VEC];
    load_as_float<T, VEC>(weight + i * VEC, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[j][k] = normed<T>(v[j][k], w[k], inv_rms);
  });
}

// One CTA per row: x [num_rows, hidden_size] (rows x_row_stride elements apart) -> out [num_rows, hidden_size].
template <typename T, int VEC>
__global__ void rms_norm(const T* __restrict__ x, long long x_row_stride, const T* __restrict__ weight,
                         T* __restrict__ out, int hidden_size, float eps) {
  begin_dependent_grid();
  const T* row = x + blockIdx.x * x_row_stride;
  const int num_vecs = hidden_size / VEC;
  const float inv_rms = inverse_rms(reduce_row<T, VEC>(row, num_vecs, Square{}, Add{}, 0.0f), hidden_size, eps);
  scale_row<T, VEC>(row, weight, out + blockIdx.x * static_cast<long long>(hidden_size), num_vecs, inv_rms);
}

// One CTA per row, the row in registers (VPT vectors a thread): x [num_rows, hidden_size] (rows x_row_stride
// elements apart) -> out e4m3 [num_rows, hidden_size] and scales [num_rows]: quantize_fp8_per_row(rms_norm(x)), its
// sum of squares formed as rms_norm forms it.
template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxRowThreads)
    rms_norm_fp8(const T* __restrict__ x, long long x_row_stride, const T* __restrict__ weight,
                 fp8_e4m3_t* __restrict__ out, float* __restrict__ scales, int hidden_size, float eps) {
  begin_dependent_grid();
  const T* row = x + blockIdx.x * x_row_stride;
  const int num_vecs = hidden_size / VEC;
  float v[VPT][VEC];
  float sum_squares = 0.0f;
  for_own_vectors<VPT>(num_vecs, [&](int j, int i) {
    load_as_float<T, VEC>(row + i * VEC, v[j]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum_squares = Add{}(sum_squares, Square{}(v[j][k]));
  });
  const float inv_rms = inverse_rms(block_reduce(sum_squares, Add{}, 0.0f), hidden_size, eps);
  scale_own_vectors<T, VEC, VPT>(v, weight, num_vecs, inv_rms);
  store_row_fp8<VEC, VPT>(v, num_vecs, out + blockIdx.x * static_cast<long long>(hidden_size), scales + blockIdx.x);
}

// One CTA per row: residual <- T(residual + x) in place, then out = rms_norm(residual). Each thread re-reads only
// the vectors it wrote itself, so no barrier is needed between the two passes.
template <typename T, int VEC>
__global__ void add_rms_norm(const T* __restrict__ x, long long x_row_stride, T* __restrict__ residual,
                             long long residual_row_stride, const T* __restrict__ weight, T* __restrict__ out,
                             int hidden_size, float eps) {
  begin_dependent_grid();
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

// One CTA per row, the row in registers: residual <- T(residual + x) in place, then out, scales =
// quantize_fp8_per_row(rms_norm(residual)), every value formed as add_rms_norm forms it.
template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxRowThreads)
    add_rms_norm_fp8(const T* __restrict__ x, long long x_row_stride, T* __restrict__ residual,
                     long long residual_row_stride, const T* __restrict__ weight, fp8_e4m3_t* __restrict__ out,
                     float* __restrict__ scales, int hidden_size, float eps) {
  begin_dependent_grid();
  const T* x_row = x + blockIdx.x * x_row_stride;
  T* residual_row = residual + blockIdx.x * residual_row_stride;
  const int num_vecs = hidden_size / VEC;
  float v[VPT][VEC];
  float sum_squares = 0.0f;
  for_own_vectors<VPT>(num_vecs, [&](int j, int i) {
    float a[VEC];
    load_as_float<T, VEC>(residual_row + i * VEC, v[j]);
    load_as_float<T, VEC>(x_row + i * VEC, a);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[j][k] = round_to<T>(__fadd_rn(v[j][k], a[k]));
      sum_squares += v[j][k] * v[j][k];
    }
    store_from_float<T, VEC>(residual_row + i * VEC, v[j]);
  });
  const float inv_rms = inverse_rms(block_reduce(sum_squares, Add{}, 0.0f), hidden_size, eps);
  scale_own_vectors<T, VEC, VPT>(v, weight, num_vecs, inv_rms);
  store_row_fp8<VEC, VPT>(v, num_vecs, out + blockIdx.x * static_cast<long long>(hidden_size), scales + blockIdx.x);
}

// The VEC elements from column i of T(T(silu(gate)) * up), in float32, for one row of gate_up (gate, then up, size
// each).
template <typename T, int VEC>
__device__ __forceinline__ void silu_mul_vector(const T* __restrict__ gate_row, int size, int i, float (&out)[VEC]) {
  float up[VEC];
  load_as_float<T, VEC>(gate_row + i, out);
  load_as_float<T, VEC>(gate_row + size + i, up);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = round_to<T>(__fmul_rn(round_to<T>(out[k] / (1.0f + expf(-out[k]))), up[k]));
}

// Grid (num_tokens, vector chunks): gate_up [num_tokens, 2 * size] (gate, then up) -> out [num_tokens, size].
template <typename T, int VEC>
__global__ void silu_and_mul(const T* __restrict__ gate_up, T* __restrict__ out, int size) {
  begin_dependent_grid();
  const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (i >= size) return;
  float v[VEC];
  silu_mul_vector<T, VEC>(gate_up + blockIdx.x * 2LL * size, size, i, v);
  store_from_float<T, VEC>(out + blockIdx.x * static_cast<long long>(size) + i, v);
}

// One CTA per token, its row in registers: gate_up [num_tokens, 2 * size] -> out e4m3 [num_tokens, size] and scales
// [num_tokens]: quantize_fp8_per_row(silu_and_mul(gate_up)).
template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxRowThreads)
    silu_and_mul_fp8(const T* __restrict__ gate_up, fp8_e4m3_t* __restrict__ out, float* __restrict__ scales,
                     int size) {
  begin_dependent_grid();
  const T* gate_row = gate_up + blockIdx.x * 2LL * size;
  const int num_vecs = size / VEC;
  float v[VPT][VEC];
  for_own_vectors<VPT>(num_vecs, [&](int j, int i) { silu_mul_vector<T, VEC>(gate_row, size, i * VEC, v[j]); });
  store_row_fp8<VEC, VPT>(v, num_vecs, out + blockIdx.x * static_cast<long long>(size), scales + blockIdx.x);
}

// silu_and_mul_fp8 with the row staged in shared memory (size values of T, dynamic) instead of registers, for rows
// too wide for the registers of two CTAs an SM: the stage is exact (silu_and_mul rounds each value to T), and a CTA
// of any size loops over its row. An 8B MLP row (1,792 vectors) held in registers takes a CTA of 1,024 threads, one
// an SM, whose loads, reduction and stores never overlap another row's.
template <typename T, int VEC>
__global__ void silu_and_mul_fp8_staged(const T* __restrict__ gate_up, fp8_e4m3_t* __restrict__ out,
                                        float* __restrict__ scales, int size) {
  begin_dependent_grid();
  extern __shared__ __align__(16) unsigned char stage_bytes[];
  T* stage = reinterpret_cast<T*>(stage_bytes);
  const T* gate_row = gate_up + blockIdx.x * 2LL * size;
  const int num_vecs = size / VEC;
  float amax = 0.0f;
#pragma unroll 4
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC];
    silu_mul_vector<T, VEC>(gate_row, size, i * VEC, v);
    amax = vector_amax<VEC>(amax, v);
    store_from_float<T, VEC>(stage + i * VEC, v);
  }
  const float inverse = fp8_row_inverse_scale(amax, scales + blockIdx.x);
  fp8_e4m3_t* out_row = out + blockIdx.x * static_cast<long long>(size);
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC];
    load_as_float<T, VEC>(stage + i * VEC, v);
    store_vector_fp8<VEC>(v, inverse, out_row + i * VEC);
  }
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
  begin_dependent_grid();
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

// One CTA per row, the row in registers: x [num_rows, num_cols] (rows x_row_stride elements apart) -> out e4m3
// [num_rows, num_cols] (contiguous) and scales [num_rows] float32, as pagedserve.kernels.fp8.quantize_per_row
// computes them (see store_row_fp8).
template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxRowThreads)
    quantize_fp8_per_row(const T* __restrict__ x, long long x_row_stride, fp8_e4m3_t* __restrict__ out,
                         float* __restrict__ scales, int num_cols) {
  begin_dependent_grid();
  const T* row = x + blockIdx.x * x_row_stride;
  const int num_vecs = num_cols / VEC;
  float v[VPT][VEC];
  for_own_vectors<VPT>(num_vecs, [&](int j, int i) { load_as_float<T, VEC>(row + i * VEC, v[j]); });
  store_row_fp8<VEC, VPT>(v, num_vecs, out + blockIdx.x * static_cast<long long>(num_cols), scales + blockIdx.x);
}

// Grid (num_rows, vector chunks): raw bfloat16 [num_rows, num_cols] contiguous (an FP8 product with unit scales) ->
// out T [num_rows, num_cols] contiguous: T(raw * row_scales[m] * col_scales[n] (+ bias[n])), in float32 in that
// order, then rounded to T (raw was rounded to bfloat16 by the product). out may be raw (T bfloat16): each element
// is read, then written, by one thread.
template <typename T, int VEC>
__global__ void scale_fp8_product(const bfloat16_t* raw, const float* __restrict__ row_scales,
                                  const float* __restrict__ col_scales, const T* __restrict__ bias, T* out,
                                  int num_cols) {
  begin_dependent_grid();
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
