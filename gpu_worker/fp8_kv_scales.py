"""Per-layer FP8 KV scales calibrated at start-up: each layer's key and value amax over one calibration forward.

An FP8 pool stores k / k_scale and v / v_scale in e4m3 (normal range 2**-6 .. 448, 3 mantissa bits). A fixed scale
of 1.0 saturates a model whose keys exceed 448 (large q/k biases) and flushes one whose values sit below 2**-9 to
zero. As vLLM's calculate_kv_scales does, the scale maps the calibration amax to a value below 448, leaving headroom
for larger values later: amax / 200 for keys and amax / 100 for values (vLLM's K_SCALE_CONSTANT and
V_SCALE_CONSTANT). Scales are fixed before any CUDA graph is captured (the kernels take them as launch arguments),
so the calibration forward runs at load time, on seeded random tokens, rather than on the first real prefill.
Scales a checkpoint carries win: its layers are left as loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.model_runner import build_batch
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM, DecoderLayer
from pagedserve.gpu_worker.sequence_state import ScheduledWork, SequenceState

K_SCALE_HEADROOM = 200.0  # the calibration's largest key maps here, 448 / 200 below saturation
V_SCALE_HEADROOM = 100.0
CALIBRATION_TOKENS = 512
CALIBRATION_BLOCK_SIZE = 16


@torch.inference_mode()
def calibrate_kv_scales(model: DecoderForCausalLM, device: torch.device, seed: int) -> list[tuple[float, float]]:
    """Sets k_scale / v_scale of every attention layer whose checkpoint gave none to the amax of its keys /
    values over one prefill of CALIBRATION_TOKENS seeded random tokens, divided by the headrooms above.

    The prefill writes to a scratch pool in the model's dtype (exact keys and values, after rotary and q/k norms,
    as the FP8 pool would receive them). Returns every layer's (k_scale, v_scale) after calibration.
    """
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, config.vocab_size, (CALIBRATION_TOKENS,), generator=generator).tolist()
    num_blocks = -(-CALIBRATION_TOKENS // CALIBRATION_BLOCK_SIZE)
    tables = BlockTableArray()
    state = SequenceState(0, token_ids, [], SamplingParams(), (), tables.add(list(range(num_blocks))),
                          num_computed_tokens=0)
    batch = build_batch([ScheduledWork.of(state, CALIBRATION_TOKENS)], tables, CALIBRATION_BLOCK_SIZE, device)
    dtype = model.embed_tokens.dtype
    scratch = torch.zeros((config.num_layers, 2, num_blocks, config.num_kv_heads, CALIBRATION_BLOCK_SIZE,
                           config.head_dim), dtype=dtype, device=device)
    model(batch.input_ids, batch.positions, batch.meta, scratch)
    # Unwritten slots of the last block hold zeros, which never raise an amax.
    amax = scratch.abs().amax(dim=(2, 3, 4, 5)).float().clamp_min(torch.finfo(torch.float32).tiny).cpu()
    scales = []
    for index, layer in enumerate(cast("Iterable[DecoderLayer]", model.layers)):
        attention = layer.attn
        if not attention.has_checkpoint_kv_scales:
            attention.k_scale = float(amax[index, 0]) / K_SCALE_HEADROOM
            attention.v_scale = float(amax[index, 1]) / V_SCALE_HEADROOM
        scales.append((attention.k_scale, attention.v_scale))
    return scales
