"""Prometheus metrics on their own HTTP port.

prometheus-client rather than the OTel metrics SDK + Prometheus exporter: the exporter is itself built on
prometheus-client, is still pre-release, and adds a translation layer between our names and what is scraped.
Names follow the OpenTelemetry GenAI semantic conventions where they define one (gen_ai.server.*), as
Prometheus spells them (dots to underscores, unit suffix).

Beside our own names, the gauges of the inference gateway's Model Server Protocol (gateway-api-inference-extension
docs/proposals/003-model-server-protocol; llm-d-router docs/plugin-metric-protocol.md) under the names its endpoint
picker reads by default, vLLM's, so that an InferencePool of tokenstream pods needs no picker configuration:
`vllm:num_requests_waiting` (TotalQueuedRequests), `vllm:num_requests_running` (TotalRunningRequests),
`vllm:kv_cache_usage_perc` (KVCacheUtilization, a 0-1 fraction of the blocks the cache holds at its maximum) and
`vllm:cache_config_info{block_size,num_gpu_blocks}` (BlockSize, NumGPUBlocks; value 1, as vLLM's info gauge).
The registry is served on the metrics port
and at GET /metrics on the HTTP port, where the picker scrapes by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from service.engine.api import KV_BLOCK, EngineStats
from service.engine.types import Chunk

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


# Counters the engine keeps in EngineStats: (metric name, description, EngineStats field).
_ENGINE_COUNTERS = (
    ("tokenstream_preemptions", "Sequences sent back to the queue for another caller", "preemptions"),
    ("tokenstream_displaced", "Queued requests refused to make room for a caller below its share", "displaced"),
    ("tokenstream_slow_readers", "Streams ended because their reader stopped reading", "slow_readers"),
    ("tokenstream_prefix_cache_queries", "Prompts looked up in the prefix cache", "prefix_queries"),
    ("tokenstream_prefix_cache_hits", "Prompt lookups that reused at least one block", "prefix_hits"),
    ("tokenstream_prefix_cache_reused_tokens", "Prompt positions copied from the prefix cache instead of prefilled",
     "prefix_reused_tokens"),
)


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time, so the decode loop does no bookkeeping for them."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily | CounterMetricFamily]:
        s = self._stats()
        if s is None:
            return
        yield GaugeMetricFamily("tokenstream_active_slots", "Sequences holding a KV-cache slot", value=s.active)
        yield GaugeMetricFamily("tokenstream_queue_depth", "Requests waiting for a slot", value=s.waiting)
        yield _batch_size_histogram(s.batch_sizes)
        yield GaugeMetricFamily("tokenstream_kv_cache_fill_ratio",
                                "Cached positions over max_slots * max_context", value=s.kv_fill_ratio)
        yield GaugeMetricFamily("tokenstream_kv_cache_bytes", "Bytes allocated to the KV cache", value=s.cache_bytes)
        for name, description, stat in _ENGINE_COUNTERS:
            yield CounterMetricFamily(name, description, value=getattr(s, stat))
        yield GaugeMetricFamily("tokenstream_prefix_cache_bytes", "Bytes of K/V kept for prefix reuse",
                                value=s.prefix_cache_bytes)
        yield from _model_server_protocol(s)


def _model_server_protocol(s: EngineStats) -> Iterator[GaugeMetricFamily]:
    """The Model Server Protocol's gauges, named as vLLM names them (see the module's docstring)."""
    yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for a slot (TotalQueuedRequests)",
                            value=s.waiting)
    yield GaugeMetricFamily("vllm:num_requests_running", "Requests holding a slot: decoding or being prefilled "
                            "(TotalRunningRequests)", value=s.running)
    yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache blocks in use over the blocks the cache holds at its "
                            "maximum, 0 to 1 (KVCacheUtilization)", value=s.kv_usage)
    info = GaugeMetricFamily("vllm:cache_config_info", "KV-cache configuration: block size in tokens and number of "
                             "blocks at the maximum (BlockSize, NumGPUBlocks)", labels=["block_size", "num_gpu_blocks"])
    info.add_metric([str(KV_BLOCK), str(s.kv_blocks)], 1.0)
    yield info


def _batch_size_histogram(per_size: tuple[int, ...]) -> HistogramMetricFamily:
    """Rows per decode step, from the engine's exact counts per batch size (kept as plain integers there)."""
    bounds = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < len(per_size)] or [1]
    buckets: list[tuple[str, float]] = []
    for bound in bounds:
        buckets.append((str(float(bound)), float(sum(per_size[1 : bound + 1]))))
    buckets.append(("+Inf", float(sum(per_size))))
    total = float(sum(size * n for size, n in enumerate(per_size)))
    return HistogramMetricFamily("tokenstream_batch_size", "Rows per decode step", buckets=buckets, sum_value=total)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tokenstream_requests", "Finished Generate calls, by front (grpc, http)",
                                ["finish_reason", "grpc_code", "front", "caller_class"], registry=r)
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds",
                              "Time from arrival to the first generated token", ["caller_class"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("gen_ai_server_time_per_output_token_seconds",
                              "Decode time per output token after the first", buckets=_TPOT_BUCKETS, registry=r)
        self.duration = Histogram("gen_ai_server_request_duration_seconds", "End-to-end request time",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("tokenstream_queue_time_seconds", "Time from arrival to the start of prefill",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tokenstream_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("tokenstream_completion_tokens", "Tokens generated", ["caller_class"],
                                         registry=r)
        r.register(_EngineCollector(stats))

    def observe(self, final: Chunk | None, code: str, front: str, caller_class: str) -> None:
        """Record one finished call: its final chunk (None when it was rejected before streaming), the canonical
        status code (the gRPC code name, which the HTTP front's statuses map onto too) and the caller's class
        (from a bounded, configured set)."""
        reason = final.finish.value if final is not None and final.finish is not None else "none"
        self.requests.labels(finish_reason=reason, grpc_code=code, front=front, caller_class=caller_class).inc()
        if final is None or final.timings is None:
            return
        t = final.timings
        self.prompt_tokens.inc(final.prompt_tokens)
        self.completion_tokens.labels(caller_class=caller_class).inc(final.completion_tokens)
        self.duration.observe(t.total_ms / 1000.0)
        if t.prefill_start_ns:
            self.queue.observe(t.queue_ms / 1000.0)
        if t.first_token_ns:
            self.ttft.labels(caller_class=caller_class).observe(t.ttft_ms / 1000.0)
        if final.completion_tokens > 1:
            self.tpot.observe(t.decode_ms / 1000.0 / (final.completion_tokens - 1))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format an Accept header asks for (Prometheus text unless OpenMetrics), and its
        content type: GET /metrics on the HTTP port, the same as the metrics port serves."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def serve(self, host: str, port: int) -> object:
        """Expose on host:port in a background thread; returns the HTTP server (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
