"""An in-memory tracer provider whose tests can wait for a span to end (no polling, no sleeps)."""

from __future__ import annotations

import threading

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class Spans(SpanProcessor):
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.provider.add_span_processor(self)
        self._ended = threading.Condition()

    def on_end(self, span: ReadableSpan) -> None:
        with self._ended:
            self._ended.notify_all()

    def finished(self, name: str, count: int = 1, timeout: float = 30) -> list[ReadableSpan]:
        """The finished spans called `name`, once there are `count` of them."""
        with self._ended:
            assert self._ended.wait_for(lambda: len(self._named(name)) >= count, timeout), f"no {count} {name!r} span"
        return self._named(name)

    def _named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def children(self, parent: ReadableSpan) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.exporter.get_finished_spans()
                if s.parent is not None and s.parent.span_id == parent.context.span_id}
