"""Prometheus metrics of a server (``GET /metrics``), in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..generation.engine import EngineObserver, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics(EngineObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("lmforge_generation_tokens", "tokens generated", registry=r)
        self.sequences = Counter("lmforge_sequences", "sequences finished, by reason", ["reason"], registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "requests waiting for a decoding slot", registry=r)
        self.busy_slots = Gauge("lmforge_busy_slots", "decoding slots in use", registry=r)
        self.slots = Gauge("lmforge_slots", "decoding slots", registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time from request to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lmforge_time_per_output_token_seconds", "time between consecutive tokens of a "
                              "sequence", buckets=LATENCY_BUCKETS, registry=r)

    def bind(self, queue_depth: Callable[[], float], busy_slots: Callable[[], float], slots: int) -> None:
        self.queue_depth.set_function(queue_depth)
        self.busy_slots.set_function(busy_slots)
        self.slots.set(slots)

    # EngineObserver (called on the engine thread; prometheus_client is thread-safe)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)

    def finished(self, seq: Sequence, reason: str) -> None:
        self.prompt_tokens.inc(len(seq.prompt_ids))
        self.generated_tokens.inc(len(seq.generated))
        self.sequences.labels(reason).inc()
