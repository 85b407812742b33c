"""The offline API's progress bar: finished prompts and token rates on stderr, as vLLM's LLM.generate shows them."""

from __future__ import annotations

import time

from tqdm import tqdm


class PromptProgress:
    """A bar over a batch of prompts, advanced as each request finishes; a no-op when not enabled.

    finished() may be called from another thread than the one that made the bar (the engine's)."""

    def __init__(self, num_prompts: int, enabled: bool = True) -> None:
        self._bar = tqdm(total=num_prompts, desc="Processed prompts", unit="prompt", dynamic_ncols=True,
                         disable=not enabled)
        self._num_prompt_tokens = 0
        self._num_output_tokens = 0
        self._start = time.monotonic()

    def finished(self, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """One more prompt done, of num_prompt_tokens, with num_output_tokens generated for it."""
        self._num_prompt_tokens += num_prompt_tokens
        self._num_output_tokens += num_output_tokens
        elapsed_s = max(time.monotonic() - self._start, 1e-9)
        self._bar.set_postfix_str(
            f"input: {self._num_prompt_tokens / elapsed_s:.1f} toks/s, "
            f"output: {self._num_output_tokens / elapsed_s:.1f} toks/s", refresh=False,
        )
        self._bar.update(1)

    def __enter__(self) -> PromptProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.close()
