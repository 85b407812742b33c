"""The engine's prefix-cache event batches (EngineService.WatchKvEvents) -> vLLM's KvEventBatch (smg.grpc.common)."""

from __future__ import annotations

from smg_grpc_proto.generated import common_pb2 as smg

from pagedserve.v1 import engine_service_pb2 as pb

_I64_SIGN = 2**63


def block_hash_to_int64(block_hash: bytes) -> int:
    """A block's SHA-256 as the protocol's int64: its first 8 bytes, big-endian, two's complement. The gateway
    uses it only as the block's identity."""
    value = int.from_bytes(block_hash[:8], "big")
    return value - 2**64 if value >= _I64_SIGN else value


def kv_event_batch_to_vllm(batch: pb.KvEventBatch, block_size: int) -> smg.KvEventBatch:
    """One batch, same sequence number. Consecutive stored blocks that extend one chain (each the parent of the
    next) travel as one KvBlocksStored, as vLLM publishes them. Events are numbered within the batch from 1."""
    out = smg.KvEventBatch(sequence_number=batch.sequence_number, timestamp=batch.timestamp_s)
    if batch.HasField("snapshot"):
        out.snapshot.CopyFrom(smg.KvSnapshotChunk(index=batch.snapshot.index, count=batch.snapshot.count,
                                                  blocks=batch.snapshot.num_blocks))
    chain_end: bytes | None = None  # the last block of the KvBlocksStored being extended
    for event in batch.events:
        which = event.WhichOneof("event")
        if which == "stored":
            stored = event.stored
            block = smg.KvBlock(block_hash=block_hash_to_int64(stored.block_hash), token_ids=stored.token_ids,
                                block_size=block_size)
            if chain_end is not None and stored.parent_block_hash == chain_end:
                out.events[-1].stored.blocks.append(block)
            else:
                blocks = smg.KvBlocksStored(blocks=[block], tier=smg.KV_CACHE_TIER_DEVICE,
                                            locality=smg.KV_CACHE_LOCALITY_LOCAL)
                if stored.parent_block_hash:
                    blocks.parent_block_hash = block_hash_to_int64(stored.parent_block_hash)
                out.events.append(smg.KvCacheEvent(event_id=len(out.events) + 1, stored=blocks))
            chain_end = stored.block_hash
            continue
        chain_end = None
        if which == "removed":
            out.events.append(smg.KvCacheEvent(event_id=len(out.events) + 1, removed=smg.KvBlocksRemoved(
                block_hashes=[block_hash_to_int64(event.removed.block_hash)], tier=smg.KV_CACHE_TIER_DEVICE,
                locality=smg.KV_CACHE_LOCALITY_LOCAL)))
        else:
            out.events.append(smg.KvCacheEvent(event_id=len(out.events) + 1, cleared=smg.KvCacheCleared()))
    return out
