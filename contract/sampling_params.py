"""A request's sampling parameters, with vLLM's defaults and ranges: validated where a request enters, then carried
as they are to the worker that applies them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.structured_output import StructuredOutput

MAX_N = 256  # completions per request
MAX_LOGPROBS = 20  # top alternatives returned per position
MAX_SEED = 2**64 - 1  # seeds travel as uint64
MAX_LOGIT_BIAS = 100.0  # |bias| per token, as OpenAI bounds it
# Stops are matched at every step of the engine's loop, for every completion: their number and size bound that work.
MAX_STOP_STRINGS = 64  # strings per request
MAX_STOP_STRING_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024  # stop token ids per request (logit_bias is bounded by the vocabulary: one entry per id)
# Bad words are matched against the newest outputs at every step on the worker, like stop strings on the engine.
MAX_BAD_WORDS = 64
MAX_BAD_WORD_CHARS = 1024
# Below this temperature a row is greedy: dividing logits by it would overflow float32.
GREEDY_TEMPERATURE = 1e-5


def _check_vocabulary(field: str, token_ids: Sequence[int], vocab_size: int) -> None:
    """InvalidArgumentError naming the first id outside [0, vocab_size). All in: one min and one max, no Python per id
    (a 1,024-token prompt checked id by id took about 0.3 ms of the frontend's event loop)."""
    if len(token_ids) > 0 and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        bad = next(token_id for token_id in token_ids if not 0 <= token_id < vocab_size)
        raise InvalidArgumentError(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def _check_float_range(field: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgumentError(field, f"must be in [{low}, {high}], got {value}")


def _check_optional_count(field: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidArgumentError(field, f"must be in [{low}, {high}], got {value}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Immutable sampling parameters of one request.

    Construction checks every range that does not depend on the model (InvalidArgumentError naming the
    field); validate() checks the rest against the model's vocabulary and context length.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = 16  # None: up to the model's context length
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit
    allowed_token_ids: tuple[int, ...] = ()  # empty: every token may be sampled
    bad_words: tuple[str, ...] = ()
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens; -1: max_model_len
    best_of: int | None = None  # only n is supported
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_bias", MappingProxyType(dict(self.logit_bias)))  # read-only
        # Lists become tuples (nothing changes after the checks), and a string alone is one stop string or bad word,
        # as vLLM takes stop="###" (not three stops at "#").
        for name in ("stop", "bad_words", "stop_token_ids", "allowed_token_ids"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        self._check_counts()
        self._check_distribution()
        self._check_stops()
        self._check_logit_bias()
        self._check_vllm_extras()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self, vocab_size: int, max_model_len: int, num_prompt_tokens: int) -> None:
        """Raises InvalidArgumentError unless these parameters fit a model and a prompt of this length."""
        if len(self.logit_bias) > vocab_size:
            raise InvalidArgumentError(
                "logit_bias", f"at most one entry per vocabulary id ({vocab_size}), got {len(self.logit_bias)}"
            )
        if len(self.allowed_token_ids) > vocab_size:
            raise InvalidArgumentError(
                "allowed_token_ids",
                f"at most one entry per vocabulary id ({vocab_size}), got {len(self.allowed_token_ids)}",
            )
        checked_ids = (
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", self.logit_bias),
            ("allowed_token_ids", self.allowed_token_ids),
        )
        for name, token_ids in checked_ids:
            _check_vocabulary(name, tuple(token_ids), vocab_size)
        max_new_tokens = max_model_len - num_prompt_tokens
        if self.max_tokens is None:
            if max_new_tokens < 1:
                raise InvalidArgumentError(
                    "max_tokens",
                    f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
                    f"{num_prompt_tokens} tokens, which leaves no room for the completion. "
                    "Please reduce the length of the prompt.",
                )
            if self.min_tokens > max_new_tokens:
                raise InvalidArgumentError(
                    "min_tokens",
                    f"must leave room for the prompt: at most {max_new_tokens} with a prompt of "
                    f"{num_prompt_tokens} tokens, got {self.min_tokens}",
                )
            return
        if num_prompt_tokens + self.max_tokens > max_model_len:
            raise InvalidArgumentError(
                "max_tokens",
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + self.max_tokens} tokens ({num_prompt_tokens} in the messages, "
                f"{self.max_tokens} in the completion). Please reduce the length of the messages or completion.",
            )

    def _check_counts(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise InvalidArgumentError("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.min_tokens < 0:
            raise InvalidArgumentError("min_tokens", f"must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None:
            if self.max_tokens < 1:
                raise InvalidArgumentError("max_tokens", f"must be at least 1, got {self.max_tokens}")
            if self.min_tokens > self.max_tokens:
                raise InvalidArgumentError(
                    "min_tokens", f"must be at most max_tokens={self.max_tokens}, got {self.min_tokens}"
                )
        _check_optional_count("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _check_optional_count("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidArgumentError("seed", f"must be in [0, 2**64 - 1], got {self.seed}")

    def _check_distribution(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InvalidArgumentError("temperature", f"must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidArgumentError("top_k", f"must be -1 or 0 (no limit) or at least 1, got {self.top_k}")
        _check_float_range("min_p", self.min_p, 0.0, 1.0)
        _check_float_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise InvalidArgumentError("repetition_penalty", f"must be positive, got {self.repetition_penalty}")

    def _check_stops(self) -> None:
        # Counts first: a rejected list is never walked, and its values are never echoed.
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgumentError("stop", f"at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if not all(self.stop):
            raise InvalidArgumentError("stop", "must not contain an empty string")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise InvalidArgumentError(
                "stop", f"each string at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgumentError(
                "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}"
            )
        if not all(token_id >= 0 for token_id in self.stop_token_ids):
            raise InvalidArgumentError("stop_token_ids", f"must be non-negative, got {list(self.stop_token_ids)}")

    def _check_logit_bias(self) -> None:
        for token_id, bias in self.logit_bias.items():
            if token_id < 0:
                raise InvalidArgumentError("logit_bias", f"token id {token_id} must be non-negative")
            if not (math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise InvalidArgumentError(
                    "logit_bias",
                    f"bias of token {token_id} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}",
                )

    def _check_vllm_extras(self) -> None:
        if not all(token_id >= 0 for token_id in self.allowed_token_ids):
            raise InvalidArgumentError("allowed_token_ids", "token ids must be non-negative")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise InvalidArgumentError("bad_words", f"at most {MAX_BAD_WORDS} words, got {len(self.bad_words)}")
        if not all(word.strip() for word in self.bad_words):
            raise InvalidArgumentError("bad_words", "must not contain an empty word")
        longest = max(map(len, self.bad_words), default=0)
        if longest > MAX_BAD_WORD_CHARS:
            raise InvalidArgumentError(
                "bad_words", f"each word at most {MAX_BAD_WORD_CHARS} characters, got one of {longest}"
            )
        keep = self.truncate_prompt_tokens
        if keep is not None and keep != -1 and keep < 1:
            raise InvalidArgumentError(
                "truncate_prompt_tokens", f"must be -1 (the maximum model length) or at least 1, got {keep}"
            )
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidArgumentError(
                "best_of",
                f"only best_of == n ({self.n}) is supported (vLLM V1 removed best_of > n), got {self.best_of}",
            )


def truncated_prompt(prompt_token_ids: Sequence[int], params: SamplingParams, max_model_len: int) -> tuple[int, ...]:
    """The prompt as truncate_prompt_tokens leaves it: its last k tokens (k = max_model_len for -1), else whole."""
    keep = params.truncate_prompt_tokens
    if keep is None:
        return tuple(prompt_token_ids)
    keep = max_model_len if keep == -1 else keep
    return tuple(prompt_token_ids[-keep:]) if len(prompt_token_ids) > keep else tuple(prompt_token_ids)


def validate_prompt(prompt_token_ids: Sequence[int], vocab_size: int, max_model_len: int) -> None:
    """Raises InvalidArgumentError unless the prompt is non-empty, fits the context and is in the vocabulary
    (the length first: an over-long prompt is never walked)."""
    if len(prompt_token_ids) == 0:
        raise InvalidArgumentError("prompt", "must not be empty")
    if len(prompt_token_ids) > max_model_len:
        raise InvalidArgumentError(
            "prompt",
            f"the prompt (length {len(prompt_token_ids)}) is longer than the maximum model length of {max_model_len}",
        )
    _check_vocabulary("prompt", prompt_token_ids, vocab_size)
