"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` runs the engine here and one worker beside it.

By default the worker is a child process reached over loopback gRPC, exactly as `pagedserve serve` starts its
local workers, so the control plane's Python and the worker's each have an interpreter of their own (the engine
plans and detokenizes step N+1 while the worker launches step N). With `worker_process=False` the worker runs on
a thread of this process instead, its steps handed over as the step contract's values, never encoded: quicker
to start, for small models and tests. This is the one module that joins control_plane and gpu_worker.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from pagedserve.clients.progress import PromptProgress
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.model_dir import ModelDirError, check_model_dir, check_tokenizer_dir
from pagedserve.contract.model_format import DeviceKind, DType, KVCacheDType, LoadFormat, Quantization
from pagedserve.contract.sampling_params import SamplingParams, truncated_prompt, validate_prompt
from pagedserve.contract.step import StepPlan, StepResult, TokenLogprobs
from pagedserve.contract.worker_info import CacheInfo, CacheRequest, WorkerInfo
from pagedserve.control_plane.config import CacheConfig, EngineConfig, SchedulerConfig, offline_step_budget
from pagedserve.control_plane.engine.engine import Engine, EngineStatus, StepRecord
from pagedserve.control_plane.engine.serving import start_engine
from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient, WorkerConnection
from pagedserve.control_plane.launch.builtin_model import BUILTIN_MODEL_NAME, write_builtin_model
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, WorkerLaunchConfig, wait_for_workers
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.chat_template import ChatTemplate, Conversation
from pagedserve.control_plane.text.constraint_validator import ConstraintValidator
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.step_pipeline import StepPipeline
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.auth import ClusterSecret
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.cpu_threads import local_worker_threads, usable_cores
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import configure_structlog

T = TypeVar("T")
# What generate() takes as one prompt: text, token ids, or vLLM's TextPrompt / TokensPrompt dicts.
Prompt = str | Sequence[int] | Mapping[str, Any]
# Prompts admitted between turns of the engine's loop: the first step is planned once this many are queued, not once
# all are (1,000 admissions of 1,024-token prompts take about 0.1 s of the loop, which the device would idle through).
ADMISSION_CHUNK = 64

__all__ = ["LLM", "CompletionOutput", "Prompt", "RequestOutput", "SamplingParams"]


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs]


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt's text when it was given as text (as vLLM's), else None
    prompt_token_ids: tuple[int, ...]
    outputs: list[CompletionOutput]


class InProcessWorker:
    """A Worker in this process, handed the step contract's values as they are (no encoding), through a
    StepPipeline: steps apply in order, step N+1 is planned while step N runs, and launched while step N's
    tokens come back."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._pipeline = StepPipeline(worker)
        self._launched: deque[asyncio.Future[LaunchedStep]] = deque()

    async def get_info(self) -> WorkerInfo:
        return self._worker.info()

    async def init_cache(self, request: CacheRequest) -> CacheInfo:
        return await self._pipeline.call(lambda: self._worker.init_cache(request))

    async def send(self, plan: StepPlan) -> None:
        self._launched.append(self._pipeline.launch(plan))

    async def receive(self) -> StepResult:
        return await self._pipeline.finish(await self._launched.popleft())

    async def close(self) -> None:
        self._pipeline.close()


class LLM:
    """A model served from this process. `model=None` uses the built-in tiny model with random weights; `tokenizer`
    reads the tokenizer from another directory than `model`'s; `cpu_threads` caps the worker process's torch threads
    (default: the cores this process may use, less one for the engine); `dependent_launch=False` launches every
    kernel plainly (`pagedserve worker --no-dependent-launch`); `quantize_lm_head=True` with FP8 weights makes the LM
    head FP8 too (`--quantize-lm-head`); `batch_invariant=True` on a CPU computes each row as if it were alone in its
    step, so that a sequence's tokens do not depend on which others share its steps (`--batch-invariant`).

    The defaults are `pagedserve serve`'s (the same config classes) but for two: without a scheduler_config a step
    takes up to offline_step_budget tokens (16,384 on devices of 70 GiB or more, else 8,192, as vLLM's LLM class),
    not the server's 2,048 (a scheduler_config given is taken as it is, so set its max_num_batched_tokens too:
    offline_step_budget gives the default); without an engine_config no line is logged per request
    (EngineConfig.log_requests). On a CPU the KV pool holds what 256 sequences of the model's length need, at most
    256 MiB unless one sequence needs more, and nothing is swapped. A model directory that cannot be served raises
    ModelDirError (a ValueError) at once.

    Log lines go to stderr, as pagedserve's processes write them (runtime/logs.py), unless the application
    configured structlog itself. The engine runs on a thread of this process, so creating an LLM shortens the
    process's thread switch interval (pagedserve.runtime.gil) for the step pipeline's hand-offs between threads, and
    freezes the objects alive before it (imported modules above all) out of the garbage collector's full collections
    (pagedserve.runtime.collector).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        tokenizer: str | Path | None = None,
        dtype: DType | str = DType.AUTO,
        device: DeviceKind | str = DeviceKind.AUTO,
        load_format: LoadFormat | str = LoadFormat.AUTO,
        seed: int = 0,
        kv_cache_dtype: KVCacheDType | str = KVCacheDType.AUTO,
        quantization: Quantization | str = Quantization.NONE,
        quantize_lm_head: bool = False,
        dependent_launch: bool = True,
        batch_invariant: bool = False,
        scheduler_config: SchedulerConfig | None = None,
        cache_config: CacheConfig | None = None,
        engine_config: EngineConfig | None = None,
        worker_process: bool = True,
        worker_start_timeout_s: float = 600.0,
        tensor_parallel_size: int = 1,
        cpu_threads: int | None = None,
    ) -> None:
        if tensor_parallel_size > 1 and not worker_process:
            raise ValueError("tensor_parallel_size above 1 needs worker_process: one process per rank")
        if cpu_threads is not None and not worker_process:
            raise ValueError("cpu_threads sets the worker process's threads; with worker_process=False the worker "
                             "runs on this process's torch threads (torch.set_num_threads)")
        tokenizer_dir = None if tokenizer is None else Path(tokenizer)
        if model is not None:  # a wrong path fails here, in milliseconds, before a worker starts
            check_model_dir(Path(model), needs_weights=LoadFormat(load_format) is not LoadFormat.DUMMY)
            tokenizer_dir = check_tokenizer_dir(Path(model), tokenizer_dir)
        elif tokenizer_dir is not None:
            raise ModelDirError("tokenizer needs model: the built-in model comes with its own tokenizer")
        if not structlog.is_configured():  # its default prints to stdout, which is the caller's
            configure_structlog()  # structlog alone (the application's own logging is its own), loggers uncached
        use_short_turns()
        freeze_startup_objects()  # before this LLM's own objects exist, so that they stay collectable after close()
        self._scratch = tempfile.TemporaryDirectory(prefix="pagedserve-")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pagedserve-engine", daemon=True)
        self._thread.start()
        self._launcher: LocalWorkers | None = None
        worker: WorkerConnection | None = None
        # A constructor that fails after this point (a worker that cannot load, a --max-model-len the model cannot
        # take) first releases what it started: the worker (its process holds the device's memory), the engine's
        # thread and the scratch directory.
        try:
            if model is None:
                model_dir = write_builtin_model(Path(self._scratch.name) / BUILTIN_MODEL_NAME)
                model_name, load_format = BUILTIN_MODEL_NAME, LoadFormat.DUMMY
            else:
                model_dir, model_name = Path(model), Path(model).name
            if worker_process:
                secret = ClusterSecret.generate()  # the worker serves only this process, even on loopback
                self._launcher = LocalWorkers(WorkerLaunchConfig(
                    model_dir=model_dir, dtype=DType(dtype), device=DeviceKind(device),
                    load_format=LoadFormat(load_format), seed=seed, cluster_secret=secret,
                    kv_cache_dtype=KVCacheDType(kv_cache_dtype), quantization=Quantization(quantization),
                    quantize_lm_head=quantize_lm_head, dependent_launch=dependent_launch,
                    batch_invariant=batch_invariant, tensor_parallel_size=tensor_parallel_size,
                    cpu_threads=cpu_threads or local_worker_threads(tensor_parallel_size, usable_cores()),
                ))
                worker = self._run(_connect(self._launcher, secret, worker_start_timeout_s))
            else:
                config = WorkerConfig(model_dir=model_dir, dtype=DType(dtype), device=DeviceKind(device),
                                      load_format=LoadFormat(load_format), seed=seed,
                                      kv_cache_dtype=KVCacheDType(kv_cache_dtype),
                                      quantization=Quantization(quantization), quantize_lm_head=quantize_lm_head,
                                      dependent_launch=dependent_launch, batch_invariant=batch_invariant)
                worker = InProcessWorker(Worker.load(config))
            if scheduler_config is None:
                device_memory_bytes = self._run(worker.get_info()).total_memory_bytes
                scheduler_config = SchedulerConfig(max_num_batched_tokens=offline_step_budget(device_memory_bytes))
            started = self._run(start_engine(
                [worker], scheduler_config, cache_config or CacheConfig(),
                engine_config or EngineConfig(log_requests=False), tokenizer_dir or model_dir, model_name,
            ))
        except BaseException:
            if worker is not None:
                self._run(worker.close())
            self._release_worker_processes_and_thread()
            raise
        self._worker: WorkerConnection = worker
        self._engine: Engine
        self.model: ServedModel
        self.tokenizer: Tokenizer
        self._engine, self.model, self.tokenizer = started
        self._constraints = ConstraintValidator(self.tokenizer, self.model.vocab_size)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt (admitted in chunks of ADMISSION_CHUNK, batched by the scheduler); outputs in
        prompt order.
        A prompt is text, token ids, or vLLM's {"prompt": text} or {"prompt_token_ids": ids}; one prompt alone (a
        string, a list of ints, a dict) is a batch of one, as vLLM takes it.
        use_tqdm: show a progress bar of finished prompts and tokens per second on stderr, as vLLM does.
        A bad prompt or parameter raises InvalidArgumentError naming the field before anything runs; a prompt the
        engine refuses to admit (ResourceExhaustedError: its queue is full, n exceeds max_num_seqs, no pool holds it)
        raises its error, the prompts admitted before it aborted; a request the engine cannot finish raises its
        error and aborts the others:
        InvalidArgumentError naming structured_output when the worker cannot compile its constraint,
        WorkerUnavailableError when its worker failed."""
        batch = _prompt_batch(prompts)
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"got {len(per_prompt)} sampling params for {len(batch)} prompts")
        prompt_ids = [
            truncated_prompt(self._prompt_token_ids(prompt, index), params, self.model.max_model_len)
            for index, (prompt, params) in enumerate(zip(batch, per_prompt, strict=True))
        ]
        for ids, p in zip(prompt_ids, per_prompt, strict=True):
            validate_prompt(ids, self.model.vocab_size, self.model.max_model_len)
            p.validate(self.model.vocab_size, self.model.max_model_len, len(ids))
            self._constraints.check(p)
        with PromptProgress(len(batch), enabled=use_tqdm) as progress:
            return self._run(self._generate_all(prompt_ids, [_prompt_text(prompt) for prompt in batch], per_prompt,
                                                progress))

    def _prompt_token_ids(self, prompt: Prompt, index: int) -> Sequence[int]:
        """The prompt's token ids; InvalidArgumentError naming prompts[index] for anything but the four forms."""
        if isinstance(prompt, Mapping):
            keys = set(prompt)
            if keys == {"prompt"} and isinstance(prompt["prompt"], str):
                return self.tokenizer.encode(prompt["prompt"])
            if keys == {"prompt_token_ids"} and _is_token_ids(prompt["prompt_token_ids"]):
                return cast("Sequence[int]", prompt["prompt_token_ids"])
            raise InvalidArgumentError(f"prompts[{index}]", "a dict prompt holds either 'prompt' (text) or "
                                       f"'prompt_token_ids' (ints) alone, got keys {sorted(keys)}")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if _is_token_ids(prompt):
            return prompt
        raise InvalidArgumentError(f"prompts[{index}]", f"a prompt is text, token ids or a dict, got "
                                   f"{type(prompt).__name__}")

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Completes one conversation (OpenAI's message dicts) or a list of them, as vLLM's LLM.chat: each rendered
        with chat_template (Jinja text) or the model's, then generated as generate() does; outputs in order.
        add_generation_prompt None: true unless continue_final_message. Raises FailedPreconditionError when there
        is no template, InvalidArgumentError when one cannot render a conversation."""
        is_batch = bool(messages) and not isinstance(messages[0], Mapping)
        conversations = cast(Sequence[Sequence[Mapping[str, Any]]], messages if is_batch else [messages])
        template = ChatTemplate(self.tokenizer, chat_template)
        prompts = [
            template.prompt_token_ids(Conversation(
                tuple(conversation), tuple(tools or ()),
                not continue_final_message if add_generation_prompt is None else add_generation_prompt,
                continue_final_message, chat_template_kwargs or {},
            ))
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    async def _generate_all(
        self, prompt_ids: list[tuple[int, ...]], prompt_texts: list[str | None], params: list[SamplingParams],
        progress: PromptProgress,
    ) -> list[RequestOutput]:
        request_ids: list[str] = []
        try:
            for ids, p in zip(prompt_ids, params, strict=True):
                request_ids.append(self._engine.add_request(ids, p, final_only=True))
                if len(request_ids) % ADMISSION_CHUNK == 0:
                    await asyncio.sleep(0)  # the lanes plan their first steps while the rest is admitted
        except Exception:
            # One the engine refuses (its queue is full, n exceeds max_num_seqs, no live worker holds it) fails the
            # call, and the prompts admitted before it are taken back (aborted: nothing of theirs is delivered, and
            # their blocks are freed), not left running unread.
            for request_id in request_ids:
                self._engine.abort(request_id)
            raise
        collecting = [
            asyncio.ensure_future(self._collect(rid, text, ids, p.n, progress))
            for rid, text, ids, p in zip(request_ids, prompt_texts, prompt_ids, params, strict=True)
        ]
        try:
            return list(await asyncio.gather(*collecting))
        finally:
            # A request that failed (its worker failed, or cannot honour a constraint) fails the call with its error,
            # as a refused one does before anything runs; the others are aborted rather than left running unread.
            for task in collecting:
                task.cancel()
            await asyncio.gather(*collecting, return_exceptions=True)

    async def _collect(
        self, request_id: str, prompt_text: str | None, prompt_ids: tuple[int, ...], n: int, progress: PromptProgress,
    ) -> RequestOutput:
        texts: list[list[str]] = [[] for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        reasons: list[FinishReason | None] = [None] * n
        async for item in self._engine.stream(request_id):
            chunk = item.chunk
            texts[chunk.completion_index].append(chunk.text)
            ids[chunk.completion_index].extend(chunk.token_ids)
            logprobs[chunk.completion_index].extend(chunk.logprobs)
            reasons[chunk.completion_index] = chunk.finish_reason or reasons[chunk.completion_index]
        outputs = [CompletionOutput(i, "".join(texts[i]), ids[i], reasons[i], logprobs[i]) for i in range(n)]
        progress.finished(len(prompt_ids), sum(map(len, ids)))
        return RequestOutput(request_id, prompt_text, prompt_ids, outputs)

    def status(self) -> EngineStatus:
        """Queue lengths, cache usage and where the steps' time went, as GetServerStatus reports them."""
        return self._engine.status()

    def recent_steps(self) -> list[StepRecord]:
        """The engine's last steps (engine.RECENT_STEPS at most), each with its size and where its time went."""
        return self._run(_recent_steps(self._engine))

    def close(self) -> None:
        self._run(self._engine.stop())
        self._run(self._worker.close())
        self._release_worker_processes_and_thread()

    def _release_worker_processes_and_thread(self) -> None:
        """Stops the worker processes (if this LLM started any) and the engine's thread; removes the scratch
        directory."""
        if self._launcher is not None:
            self._launcher.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._scratch.cleanup()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_token_ids(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(
        isinstance(token_id, int) for token_id in value)


def _prompt_text(prompt: Prompt) -> str | None:
    if isinstance(prompt, str):
        return prompt
    return prompt.get("prompt") if isinstance(prompt, Mapping) else None


def _prompt_batch(prompts: Prompt | Sequence[Prompt]) -> Sequence[Prompt]:
    """The prompts as a batch: one prompt alone (text, a dict, or token ids, which no batch's first element is)
    becomes a batch of one."""
    if isinstance(prompts, (str, Mapping)) or (prompts and isinstance(prompts[0], int)):
        return [cast("Prompt", prompts)]
    return cast("Sequence[Prompt]", prompts)


async def _recent_steps(engine: Engine) -> list[StepRecord]:
    return engine.recent_steps()  # read on the engine's loop, between its steps


async def _connect(launcher: LocalWorkers, secret: ClusterSecret, timeout_s: float) -> GrpcWorkerClient:
    """Starts the launcher's worker and waits until it serves; fails early when the process exits."""
    (address,) = launcher.start()
    client = GrpcWorkerClient(address, secret)
    try:
        await wait_for_workers([client], timeout_s, launcher)
    except BaseException:
        await client.close()
        raise
    return client
