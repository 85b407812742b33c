// paged_decode's per-warp pipelines that stage K/V tiles into shared memory: cp.async, or the tensor memory
// accelerator (sm_90).
#pragma once

#include "bulk_copy.cuh"
#include "tensor_core.cuh"

// dst: a shared-window address; src_bytes 0 fills the BYTES with zeros. The 16-byte copies ask L2 to fetch
// whole 128-byte lines (a warp's copies cover them anyway): measured 1.5-2% faster on bandwidth-bound grids.
template <int BYTES>
__device__ __forceinline__ void copy_async(unsigned dst, const void* src, int src_bytes) {
  if (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(BYTES), "r"(src_bytes));
  }
}

// Block ids of one warp's tiles k = 0, 1, ... (tile k starts at token (first_tile + k * tile_stride) * TILE), read
// in windows of window_tiles tiles: lane l holds the id of block slot l % span of tile l / span (span: the most
// blocks one tile can touch). A window is read from the block table while the one before it is copied, and each
// copy takes its id from the owning lane by shuffle, so no copy waits on a table read.
template <int TILE>
struct BlockWindow {
  const int* table;
  int log2_block_size, table_width, first_tile, tile_stride, my_tiles, context_len, lane;
  int span, window_tiles;   // block slots per tile (at most 32, see decode_layout), tiles per window
  int window_first;         // the first tile of the current window
  int window, next_window;  // this lane's block id in the current and the next window (-1 past the table)
  int first_issued;         // how many of the pipeline's first tiles (0 .. STAGES - 2) are issued

  static constexpr int kAllTokens = 0x7fffffff;  // a ready_len (see is_next_first_tile_ready) past any tile

  __device__ __forceinline__ int tile_start(int k) const { return (first_tile + k * tile_stride) * TILE; }

  // Whether the next unissued tile of the first stages - 1 ends at or before token ready_len: tiles are issued
  // in order, those wholly before the tokens the kernel before this one may still be writing first.
  __device__ __forceinline__ bool is_next_first_tile_ready(int stages, int ready_len) const {
    return first_issued < stages - 1 && tile_start(first_issued) + TILE <= ready_len;
  }

  // This lane's block id of the window whose first tile is k, bounded by the table width only: it needs no
  // context length, so the first two windows are read before the sequence length arrives.
  __device__ __forceinline__ int window_block(int k) const {
    const int block = (tile_start(k + lane / span) >> log2_block_size) + lane % span;
    return lane < window_tiles * span && block < table_width ? table[block] : -1;
  }

  __device__ __forceinline__ void prefetch_blocks(const int* __restrict__ block_tables, int block_table_stride,
                                                  int seq) {
    table = block_tables + static_cast<long long>(seq) * block_table_stride;
    const int block_size = 1 << log2_block_size;
    span = TILE % block_size == 0 ? TILE >> log2_block_size
                                  : (block_size % TILE == 0 ? 1 : (TILE - 1) / block_size + 2);
    window_tiles = 32 / span;
    window_first = 0;
    window = window_block(0);
    next_window = window_block(window_tiles);
  }

  // The warp's share of a context of context_len_ tokens, none of its tiles issued yet.
  __device__ __forceinline__ void set_context(int context_len_) {
    context_len = context_len_;
    const int num_tiles = (context_len + TILE - 1) / TILE;
    my_tiles = first_tile < num_tiles ? (num_tiles - 1 - first_tile) / tile_stride + 1 : 0;
    first_issued = 0;
  }

  // Moves to the window of tile k; tiles are entered in order.
  __device__ __forceinline__ void enter(int k) {
    if (k == window_first + window_tiles) {
      window_first = k;
      window = next_window;
      next_window = window_block(k + window_tiles);
    }
  }

  // The id of the block holding token pos of tile k, entered (a shuffle: the whole warp calls it).
  __device__ __forceinline__ int block_of(int k, int pos) const {
    const int owner = (k - window_first) * span + (pos >> log2_block_size) - (tile_start(k) >> log2_block_size);
    return __shfl_sync(0xffffffffu, window, min(owner, 31));
  }
};

// One warp's cp.async pipeline over its tiles: stage k % STAGES holds tile k's keys then values, tiles of
// kTileElems elements laid out as State::staged_address places each copy; tokens past the context (or in blocks
// past the table) are zero-filled.
template <typename State, int STAGES>
struct TilePipeline : BlockWindow<State::kTile> {
  using T = typename State::Element;
  static constexpr int kTile = State::kTile;
  static constexpr int kRowStride = State::kRowStride;
  static constexpr int kRowBytes = State::kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kCopyBytes = kRowBytes % 16 == 0 ? 16 : (kRowBytes % 8 == 0 ? 8 : 4);  // MmaState: 16
  static constexpr int kCopiesPerRow = kRowBytes / kCopyBytes;
  static constexpr int kCopiesPerTile = kTile * kCopiesPerRow;  // of keys; as many of values
  static constexpr int kCopiesPerLane = (kCopiesPerTile + 31) / 32;
  static constexpr int kTileElems = kTile * kRowStride;
  static constexpr int kWarpElems = STAGES * 2 * kTileElems;  // keys then values, per stage
  static_assert(kRowBytes % 4 == 0, "rows are copied in units of at least 4 bytes");

  const T* key_base;    // this kv head's cache, block 0
  const T* value_base;
  T* stages;            // this warp's shared memory
  unsigned stages_address;  // the same, as a shared-window address
  long long block_stride;

  // The shared memory the warps' stages take up, from the start of the dynamic shared memory.
  static __device__ __forceinline__ unsigned char* stage_space(unsigned char* shared) { return shared; }

  __device__ __forceinline__ void bind(const T* key_cache, const T* value_cache, const TensorMap&, const TensorMap&,
                                       int kv_head, int num_kv_heads, unsigned char* shared, int warp) {
    const long long head_stride = (1LL << this->log2_block_size) * State::kHeadDim;
    key_base = key_cache + kv_head * head_stride;
    value_base = value_cache + kv_head * head_stride;
    block_stride = head_stride * num_kv_heads;
    stages = reinterpret_cast<T*>(shared) + warp * kWarpElems;
    stages_address = shared_address(stages);
  }

  __device__ __forceinline__ const T* keys(int k) const { return stages + (k % STAGES) * 2 * kTileElems; }

  __device__ __forceinline__ void issue(int k) {
    this->enter(k);
    constexpr int kElementBytes = static_cast<int>(sizeof(T));
    const unsigned stage = stages_address + (k % STAGES) * 2 * kTileElems * kElementBytes;
    const int offset_mask = (1 << this->log2_block_size) - 1;
#pragma unroll
    for (int i = 0; i < kCopiesPerLane; ++i) {
      const int copy = this->lane + 32 * i;
      const int token = copy / kCopiesPerRow;
      const int pos = this->tile_start(k) + token;
      const int block = this->block_of(k, pos);
      if (kCopiesPerTile % 32 != 0 && copy >= kCopiesPerTile) continue;
      const int part = (copy % kCopiesPerRow) * (kCopyBytes / kElementBytes);
      const bool is_valid = pos < this->context_len && block >= 0;
      const long long src = is_valid ? block * block_stride + (pos & offset_mask) * State::kHeadDim + part : 0;
      const unsigned dst = State::staged_address(stage, token, part * kElementBytes);
      copy_async<kCopyBytes>(dst, key_base + src, is_valid ? kCopyBytes : 0);
      copy_async<kCopyBytes>(dst + kTileElems * kElementBytes, value_base + src, is_valid ? kCopyBytes : 0);
    }
  }

  // Takes the warp's share of a context of context_len tokens and issues those of its tiles 0 .. STAGES - 2 that
  // end at or before token ready_len; issue_first_tiles(kAllTokens) issues the rest.
  __device__ __forceinline__ void start(int context_len, int ready_len) {
    this->set_context(context_len);
    issue_first_tiles(ready_len);
  }

  // One commit group per first tile, in order, whether it holds copies or lies past the warp's share.
  __device__ __forceinline__ void issue_first_tiles(int ready_len) {
    for (; this->is_next_first_tile_ready(STAGES, ready_len); ++this->first_issued) {
      if (this->first_issued < this->my_tiles) issue(this->first_issued);
      asm volatile("cp.async.commit_group;");
    }
  }

  // Issues tile k + STAGES - 1 and waits for tile k.
  __device__ __forceinline__ void advance(int k) {
    if (k + STAGES - 1 < this->my_tiles) issue(k + STAGES - 1);
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1));
    __syncwarp();  // every lane's copies of tile k have landed
  }

  __device__ __forceinline__ void finish() const { asm volatile("cp.async.wait_group 0;"); }
};

// One warp's pipeline of tiles staged by the tensor memory accelerator (sm_90): stage k % STAGES holds tile k's
// keys then values, each as column blocks of State::kBoxBytes-byte rows (64-dim halves of 16-bit rows, whole
// 128- or 64-byte e4m3 rows) in the swizzle of that width (MmaState with TMA_STAGED reads them, see its
// chunk_address). A tile is one or two boxes of min(TILE, block_size) rows per column block, copied by one lane;
// the stage's mbarrier counts their bytes. Boxes of blocks past the table read as zeros (out of bounds); tokens
// past the context are read as stored, and their value rows are zeroed before use (their scores are masked, but
// a stale NaN times a zero probability would still be NaN).
template <typename State, int STAGES>
struct TmaPipeline : BlockWindow<State::kTile> {
  using T = typename State::Element;
  static constexpr int kTile = State::kTile;
  static constexpr int kBoxes = State::kBoxes;  // column blocks of a row
  static constexpr int kBoxBytes = State::kBoxBytes;
  static constexpr int kBoxColumns = kBoxBytes / static_cast<int>(sizeof(T));
  static constexpr int kTileElems = kTile * State::kHeadDim;
  static constexpr int kTileBytes = kTileElems * static_cast<int>(sizeof(T));
  static constexpr int kWarpBytes = STAGES * 2 * kTileBytes;
  static constexpr int kSwizzleBytes = 1024;  // tiles start on this alignment: the 128-byte swizzle's 8 rows
  static_assert(kBoxes * kBoxBytes == State::kHeadDim * static_cast<int>(sizeof(T)), "rows are whole boxes");
  static_assert(kTile % 8 == 0 && kTileBytes % kSwizzleBytes == 0, "boxes of at least 8 rows, aligned");
  static_assert(8 * kBoxBytes % 512 == 0, "a box of 8 rows is whole repeats of its swizzle (512 or 1024 bytes)");

  const TensorMap* key_map;
  const TensorMap* value_map;
  const T* stages;
  unsigned stages_address;
  unsigned barriers;  // this warp's STAGES mbarriers, shared-window address
  int kv_head, num_kv_heads;

  static constexpr int kBarrierBytes = 1024;  // at the start of the dynamic shared memory: every warp's barriers
  static_assert(32 * STAGES * 8 <= kBarrierBytes, "room for the barriers of a CTA of up to 32 warps");

  // The warps' stages: after the barriers, aligned for the swizzle. The launcher adds 2 KiB to the stages for
  // both.
  static __device__ __forceinline__ unsigned char* stage_space(unsigned char* shared) {
    const unsigned start = shared_address(shared);
    const unsigned stages = (start + kBarrierBytes + kSwizzleBytes - 1) & ~(kSwizzleBytes - 1);
    return shared + (stages - start);
  }

  __device__ __forceinline__ void bind(const T*, const T*, const TensorMap& key_map_, const TensorMap& value_map_,
                                       int kv_head_, int num_kv_heads_, unsigned char* shared, int warp) {
    key_map = &key_map_;
    value_map = &value_map_;
    kv_head = kv_head_;
    num_kv_heads = num_kv_heads_;
    stages = reinterpret_cast<const T*>(stage_space(shared) + warp * kWarpBytes);
    stages_address = shared_address(stages);
    barriers = shared_address(shared) + warp * STAGES * 8;
  }

  __device__ __forceinline__ const T* keys(int k) const { return stages + (k % STAGES) * 2 * kTileElems; }

  __device__ __forceinline__ void issue(int k) {
    this->enter(k);
    const unsigned stage = stages_address + (k % STAGES) * 2 * kTileBytes;
    const unsigned barrier = barriers + (k % STAGES) * 8;
    if (this->lane == 0) arrive_expecting(barrier, 2 * kTileBytes);
    const int log2_box_rows = min(this->log2_block_size, 31 - __clz(kTile));
#pragma unroll
    for (int box = 0; box < kTile / 8; ++box) {
      if (box << log2_box_rows >= kTile) break;
      const int pos = this->tile_start(k) + (box << log2_box_rows);
      const int block = this->block_of(k, pos);
      const int offset = pos & ((1 << this->log2_block_size) - 1);
      const int row = block >= 0 ? ((block * num_kv_heads + kv_head) << this->log2_block_size) + offset : -kTile;
      if (this->lane == 0) {
#pragma unroll
        for (int column_block = 0; column_block < kBoxes; ++column_block) {
          const unsigned dst = stage + (column_block * kTile + (box << log2_box_rows)) * kBoxBytes;
          load_box(dst, *key_map, column_block * kBoxColumns, row, barrier);
          load_box(dst + kTileBytes, *value_map, column_block * kBoxColumns, row, barrier);
        }
      }
    }
  }

  // Initialises the warp's barriers, takes its share of a context of context_len tokens and issues those of its
  // tiles 0 .. STAGES - 2 that end at or before token ready_len; issue_first_tiles(kAllTokens) issues the rest.
  __device__ __forceinline__ void start(int context_len, int ready_len) {
    this->set_context(context_len);
    if (this->lane < STAGES) init_barrier(barriers + this->lane * 8);
    fence_barrier_init();
    __syncwarp();
    issue_first_tiles(ready_len);
  }

  __device__ __forceinline__ void issue_first_tiles(int ready_len) {
    for (; this->is_next_first_tile_ready(STAGES, ready_len); ++this->first_issued) {
      if (this->first_issued < this->my_tiles) issue(this->first_issued);
    }
  }

  // Issues tile k + STAGES - 1 and waits for tile k.
  __device__ __forceinline__ void advance(int k) {
    if (k + STAGES - 1 < this->my_tiles) issue(k + STAGES - 1);
    wait_barrier(barriers + (k % STAGES) * 8, (k / STAGES) & 1);
    const int valid = this->context_len - this->tile_start(k);
    if (valid < kTile) {  // the context's last tile: zero the value rows past it
      const unsigned values = stages_address + (k % STAGES) * 2 * kTileBytes + kTileBytes;
      for (int chunk = this->lane; chunk < kTileBytes / 16; chunk += 32) {
        if (chunk / (kBoxBytes / 16) % kTile >= valid) {  // chunks of column block b, row r, in that order
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(values + chunk * 16), "r"(0u) : "memory");
        }
      }
    }
    __syncwarp();
  }

  __device__ __forceinline__ void finish() const {}  // every issued tile has been waited for
};
