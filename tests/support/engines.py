"""The real engine in-process, as the engine-level tests drive it: one config shape, a chunk collector, a batch run."""

from __future__ import annotations

import threading

from service.engine.api import EngineConfig
from service.engine.checkpoints.loader import LoadedModel
from service.engine.hooks import EngineHooks
from service.engine.scheduler import Engine
from service.engine.types import Chunk, GenerationRequest


def make_engine(model: LoadedModel, hooks: EngineHooks | None = None, **overrides: object) -> Engine:
    values: dict = {"max_slots": 8, "max_prefill_tokens": 256, "max_context": 512}
    values.update(overrides)
    engine = Engine(model, EngineConfig(**values), hooks=hooks)
    engine.start(warmup=False)
    return engine


class Collector:
    """Collects one stream's chunks on the engine thread; `done` is set by the final chunk."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.done = threading.Event()

    def __call__(self, batch: list[Chunk]) -> None:
        self.chunks.extend(batch)
        if any(c.finish is not None for c in batch):
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [t.id for c in self.chunks for t in c.tokens]

    @property
    def final(self) -> Chunk:
        return self.chunks[-1]


def run_many(engine: Engine, reqs: list[GenerationRequest], timeout: float = 120) -> list[Collector]:
    collectors = [Collector() for _ in reqs]
    for req, col in zip(reqs, collectors, strict=True):
        engine.submit(req, col)
    for col in collectors:
        assert col.done.wait(timeout), "stream did not finish"
    return collectors
