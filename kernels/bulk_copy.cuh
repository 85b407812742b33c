// The tensor memory accelerator (sm_90 and later): tensor maps, mbarriers and the tensor copies that complete on
// them. Needs no CUDA header, like kernel_common.cuh.
#pragma once

// A CUtensorMap, encoded on the host (kernels/tensor_map.py) and passed as a __grid_constant__ parameter.
struct __align__(64) TensorMap {
  unsigned long long opaque[16];
};

// barrier: a shared-window address of an 8-byte mbarrier expecting one arrival per phase.
__device__ __forceinline__ void init_barrier(unsigned barrier) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(barrier) : "memory");
}

// Makes initialised barriers visible to the copy engine.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// The arrival of the current phase, which then also waits for `bytes` of copies.
__device__ __forceinline__ void arrive_expecting(unsigned barrier, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(barrier), "r"(bytes) : "memory");
}

// Waits until the phase of the given parity has completed.
__device__ __forceinline__ void wait_barrier(unsigned barrier, unsigned parity) {
  unsigned done;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done)
                 : "r"(barrier), "r"(parity)
                 : "memory");
  } while (!done);
}

// Copies the box of `map` at (column, row) to dst (a shared-window address aligned as the map's swizzle needs)
// and counts its bytes on barrier. Out-of-bounds parts of the box read as zeros and still count.
__device__ __forceinline__ void load_box(unsigned dst, const TensorMap& map, int column, int row, unsigned barrier) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
      ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(column), "r"(row), "r"(barrier)
      : "memory");
}
