"""Prometheus metrics with vLLM's names, types and buckets under the `pagedserve:` prefix, labelled by model (and by
worker where a figure is one worker's). docs/metrics.md lists them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry, Counter, start_http_server

from pagedserve.control_plane.engine.histogram import (
    INTER_TOKEN_BUCKETS_S,
    ITERATION_TOKEN_BUCKETS,
    PARAMS_N_BUCKETS,
    REQUEST_LATENCY_BUCKETS_S,
    TTFT_BUCKETS_S,
    FastHistogram,
    buckets_1_2_5,
)
from pagedserve.control_plane.engine.worker_metrics import PREFIX, WORKER_LABELS, WorkerCollector
from pagedserve.control_plane.scheduling.request import FinishReason

if TYPE_CHECKING:
    from pagedserve.control_plane.engine.status import WorkerStatus


class RequestRecord(NamedTuple):
    """One request that ended, as its request-level metrics read it. Times are time.monotonic() seconds.

        arrival ── queue ──▶ first scheduled ── prefill ──▶ first token ── decode ──▶ last token ... end
                             └──────────────────── inference ───────────────────────┘
    """

    arrival_s: float
    first_scheduled_s: float | None  # None: never scheduled (ended while waiting)
    first_token_s: float | None  # None: no token came
    last_token_s: float | None
    end_s: float
    num_prompt_tokens: int
    num_generation_tokens: int  # over all n completions
    n: int
    max_tokens: int | None  # as asked, else what max_model_len leaves (None: no limit known)


class EngineMetrics:
    """The engine's metrics: histograms observed as requests stream, steps complete and requests end, plus each
    worker's status read at scrape time (WorkerCollector). Written only by the engine loop's thread."""

    def __init__(self, model_name: str, max_model_len: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._model = (model_name,)
        self._model_name = model_name
        tokens = buckets_1_2_5(max_model_len)

        def histogram(name: str, documentation: str, bounds: Sequence[float],
                      labels: Sequence[str] = ("model_name",)) -> FastHistogram:
            collector = FastHistogram(PREFIX + name, documentation, bounds, labels)
            self.registry.register(collector)
            return collector

        self._ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               TTFT_BUCKETS_S)
        self._itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              INTER_TOKEN_BUCKETS_S)
        self._e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              REQUEST_LATENCY_BUCKETS_S)
        self._queue = histogram("request_queue_time_seconds",
                                "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS_S)
        self._prefill = histogram("request_prefill_time_seconds",
                                  "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS_S)
        self._decode = histogram("request_decode_time_seconds",
                                 "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS_S)
        self._inference = histogram("request_inference_time_seconds",
                                    "Histogram of time spent in RUNNING phase for request.",
                                    REQUEST_LATENCY_BUCKETS_S)
        self._prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self._generation_tokens = histogram("request_generation_tokens", "Number of generation tokens processed.",
                                            tokens)
        self._params_n = histogram("request_params_n", "Histogram of the n request parameter.", PARAMS_N_BUCKETS)
        self._params_max_tokens = histogram("request_params_max_tokens",
                                            "Histogram of the max_tokens request parameter.", tokens)
        self._iteration_tokens = histogram("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                           ITERATION_TOKEN_BUCKETS, WORKER_LABELS)
        finished = Counter(PREFIX + "request_success", "Count of finished completions by finish reason.",
                           ["model_name", "finished_reason"], registry=self.registry)
        # One child per reason, looked up once: labels() validates and locks on every call.
        self._finished = {reason: finished.labels(model_name, reason.name.lower()) for reason in FinishReason}
        resumed = Counter(PREFIX + "request_resumptions", "Requests computed again on another worker after theirs "
                          "failed, by where: a live worker at once, or a restarted one they waited for.",
                          ["model_name", "worker"], registry=self.registry)
        self._resumed = {waited: resumed.labels(model_name, "restarted" if waited else "live")
                         for waited in (False, True)}

    def bind_workers(self, workers: Callable[[], Sequence[WorkerStatus]]) -> None:
        """Exports each worker's status, read by calling workers() at every scrape."""
        self.registry.register(WorkerCollector(self._model_name, workers))

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(self._model, seconds)

    def observe_itl(self, seconds_per_token: float, num_tokens: int) -> None:
        self._itl.observe(self._model, seconds_per_token, num_tokens)

    def observe_iteration(self, worker_id: str, num_tokens: int) -> None:
        """One step of worker_id computed num_tokens (prompt and decode tokens together)."""
        self._iteration_tokens.observe((self._model_name, worker_id), num_tokens)

    def request_resumed(self, waited: bool) -> None:
        """A request whose worker failed went on on another lane: a live one, or (waited) a revived one."""
        self._resumed[waited].inc()

    def request_aborted(self) -> None:
        """A client left before its request ended: counted, its partial timings not observed."""
        self._finished[FinishReason.ABORT].inc()

    def request_ended(self, reasons: Sequence[FinishReason | None], record: RequestRecord) -> None:
        """A request ended on its own or was ended by the server: its finish reasons counted, its figures observed
        (the phases it never reached are not)."""
        for reason in reasons:
            if reason is not None:
                self._finished[reason].inc()
        model = self._model
        self._e2e.observe(model, record.end_s - record.arrival_s)
        self._prompt_tokens.observe(model, record.num_prompt_tokens)
        self._generation_tokens.observe(model, record.num_generation_tokens)
        self._params_n.observe(model, record.n)
        if record.max_tokens is not None:
            self._params_max_tokens.observe(model, record.max_tokens)
        if record.first_scheduled_s is None:
            return
        self._queue.observe(model, record.first_scheduled_s - record.arrival_s)
        if record.first_token_s is None or record.last_token_s is None:
            return
        self._prefill.observe(model, record.first_token_s - record.first_scheduled_s)
        self._decode.observe(model, record.last_token_s - record.first_token_s)
        self._inference.observe(model, record.last_token_s - record.first_scheduled_s)

    def serve(self, host: str, port: int) -> None:
        """Starts the /metrics HTTP endpoint in a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
