"""Which slice of each weight a rank holds: attention by heads, the MLP by columns, the vocabulary by rows.

For rank r of N ranks:
    q heads      [r * H/N, (r + 1) * H/N)             (H query heads)
    kv heads     [r * K/N, (r + 1) * K/N)  when K >= N (K key/value heads, a multiple of N)
                 r * K // N, one head       when K < N  (N a multiple of K: N/K ranks share, replicate, each head)
    mlp columns  [r * I/N, (r + 1) * I/N)             (I intermediate size)
    vocab rows   [r * V', (r + 1) * V') ∩ [0, V)       (V' = ceil(V / N); the last rank's rows past V are padding)
Column-parallel weights (q/k/v, gate/up) are cut along their output rows, row-parallel ones (o_proj, down_proj)
along their input columns; norms are whole on every rank.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from pagedserve.gpu_worker.errors import ModelLoadError
from pagedserve.gpu_worker.models.model_config import ModelConfig


class Split(enum.Enum):
    """How a Hugging Face weight is divided among the ranks."""

    Q_ROWS = "q_rows"  # q_proj weight and bias: this rank's query heads
    KV_ROWS = "kv_rows"  # k_proj / v_proj weight and bias: this rank's key/value heads
    Q_COLUMNS = "q_columns"  # o_proj: the inputs that are this rank's query heads
    MLP_ROWS = "mlp_rows"  # gate_proj / up_proj: this rank's intermediate columns
    MLP_COLUMNS = "mlp_columns"  # down_proj: the inputs that are this rank's intermediate columns
    VOCAB_ROWS = "vocab_rows"  # embed_tokens / lm_head: this rank's vocabulary rows
    WHOLE = "whole"  # norms


@dataclass(frozen=True, slots=True)
class TensorSlice:
    """Elements [start, stop) of dimension dim of a weight."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """The slices rank `rank` of `size` holds of a model of config (the full model's); raises ModelLoadError when
    the model's heads or columns do not divide among size ranks."""

    config: ModelConfig
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        cfg, size = self.config, self.size
        if cfg.num_heads % size:
            raise ModelLoadError(f"tensor parallel size {size} does not divide the {cfg.num_heads} attention heads")
        if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
            raise ModelLoadError(f"tensor parallel size {size} and the {cfg.num_kv_heads} key/value heads: one must "
                                 "divide the other")
        if cfg.intermediate_size % size:
            raise ModelLoadError(f"tensor parallel size {size} does not divide intermediate_size "
                                 f"{cfg.intermediate_size}")

    @property
    def num_heads(self) -> int:
        return self.config.num_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        return max(self.config.num_kv_heads // self.size, 1)

    @property
    def first_kv_head(self) -> int:
        return self.rank * self.config.num_kv_heads // self.size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size // self.size

    @property
    def vocab_rows_per_rank(self) -> int:
        """V' = ceil(V / N): the rows of every rank's embedding and LM head, padding included."""
        return -(-self.config.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows_per_rank

    @property
    def num_vocab_rows(self) -> int:
        """This rank's real vocabulary rows (the last rank's may be fewer than V')."""
        return max(min(self.vocab_rows_per_rank, self.config.vocab_size - self.vocab_start), 0)

    @property
    def local_config(self) -> ModelConfig:
        """The config of the decoder this rank runs: its heads and columns; the vocabulary stays whole (the LM
        head's output is gathered)."""
        return dataclasses.replace(self.config, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.intermediate_size)

    def slice_of(self, split: Split) -> TensorSlice | None:
        """The slice of a weight split that way this rank reads; None for the whole weight."""
        if self.size == 1 or split is Split.WHOLE:
            return None
        head_dim = self.config.head_dim
        q_start, kv_start = self.rank * self.num_heads * head_dim, self.first_kv_head * head_dim
        mlp_start = self.rank * self.intermediate_size
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        slices = {
            Split.Q_ROWS: TensorSlice(0, q_start, q_start + q_size),
            Split.KV_ROWS: TensorSlice(0, kv_start, kv_start + kv_size),
            Split.Q_COLUMNS: TensorSlice(1, q_start, q_start + q_size),
            Split.MLP_ROWS: TensorSlice(0, mlp_start, mlp_start + self.intermediate_size),
            Split.MLP_COLUMNS: TensorSlice(1, mlp_start, mlp_start + self.intermediate_size),
            Split.VOCAB_ROWS: TensorSlice(0, self.vocab_start, self.vocab_start + self.num_vocab_rows),
        }
        return slices[split]
