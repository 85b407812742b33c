// The online-softmax step shared by paged_decode's states and its merges.
#pragma once

#include "kernel_common.cuh"

// exp2(x - m) with the convention that a max of -inf (nothing seen yet) scales everything to 0.
__device__ __forceinline__ float scale_from(float x, float m) {
  return m == negative_infinity() ? 0.0f : exp2f(x - m);
}
