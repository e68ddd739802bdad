"""Delivery: chunks go from the engine thread to each stream's consumer, batched per event loop per iteration."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from service.engine.api import StreamMarks
from service.engine.types import Chunk


class StreamHandle:
    """Shared by the engine thread and one consumer. Each side writes only its own fields."""

    def __init__(self, deliver: Callable[[list[Chunk]], None], loop: asyncio.AbstractEventLoop | None,
                 paced: bool = False) -> None:
        self.deliver = deliver
        self.loop = loop
        # Whether the consumer reports its reading (consumed, last_read), so that a stalled reader can be ended.
        # A plain callback consumes as it is called: it is never behind.
        self.paced = paced
        self.cancelled = False  # consumer side; the engine stops the sequence at its next step
        self.consumed = 0  # consumer side
        # Consumer side: whether it is waiting for a message now, and when it last took one. A reader that waits
        # is never behind, however long the request queues; one that has taken a message and not come back (its
        # front is blocked writing it) is.
        self.reading = False
        self.last_read = time.monotonic()
        self.emitted = 0  # engine side
        self.marks = StreamMarks()  # engine side

    def cancel(self) -> None:
        self.cancelled = True


class Outbox:
    """The chunks of one engine iteration, handed over with one call_soon_threadsafe per event loop."""

    def __init__(self) -> None:
        self._items: list[tuple[StreamHandle, Chunk]] = []

    def put(self, handle: StreamHandle, chunk: Chunk) -> None:
        handle.emitted += 1
        handle.marks.tokens_emitted += len(chunk.tokens)
        self._items.append((handle, chunk))

    def publish(self) -> None:
        if not self._items:
            return
        grouped: dict[int, tuple[StreamHandle, list[Chunk]]] = {}
        for handle, chunk in self._items:
            grouped.setdefault(id(handle), (handle, []))[1].append(chunk)
        self._items = []
        by_loop: dict[Any, list[tuple[StreamHandle, list[Chunk]]]] = {}
        for handle, chunks in grouped.values():
            if handle.loop is None:
                handle.deliver(chunks)
            else:
                by_loop.setdefault(handle.loop, []).append((handle, chunks))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the loop has closed: nobody is listening
                for handle, _ in items:
                    handle.cancel()


def _deliver_all(items: list[tuple[StreamHandle, list[Chunk]]]) -> None:
    for handle, chunks in items:
        handle.deliver(chunks)


class AsyncStream:
    """An event loop's view of one request: an async iterator of chunks that ends after the final one."""

    def __init__(self, submit: Callable[..., StreamHandle]) -> None:
        self._chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        self._handle = submit(self._put_all, asyncio.get_running_loop(), paced=True)
        self._done = False

    def _put_all(self, batch: list[Chunk]) -> None:
        for chunk in batch:
            self._chunks.put_nowait(chunk)

    @property
    def marks(self) -> StreamMarks:
        return self._handle.marks

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        # Here, the front has finished writing the previous message; a blocked write keeps it away, which is how
        # a reader that stopped reading shows.
        handle = self._handle
        handle.reading = True
        try:
            chunk = await self._chunks.get()
        finally:
            handle.reading = False
            handle.last_read = time.monotonic()
        handle.consumed += 1
        self._done = chunk.finish is not None
        return chunk

    def cancel(self) -> None:
        """A no-op once finished; otherwise the engine ends the sequence at its next step."""
        if not self._done:
            self._handle.cancel()


def iterate_sync(submit: Callable[..., StreamHandle]) -> Iterator[Chunk]:
    """The same for threads without an event loop (tests, benchmarks); closing the iterator cancels."""
    out: queue.SimpleQueue[Chunk] = queue.SimpleQueue()

    def put_all(batch: list[Chunk]) -> None:
        for chunk in batch:
            out.put(chunk)

    handle = submit(put_all, None, paced=True)
    try:
        while True:
            handle.reading = True
            chunk = out.get()
            handle.reading = False
            handle.last_read = time.monotonic()
            handle.consumed += 1
            yield chunk
            if chunk.finish is not None:
                return
    finally:
        handle.cancel()
