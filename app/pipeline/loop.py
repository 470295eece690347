"""The worker's asyncio loop, in a thread: messages and periodic chores run on it.

Each gunicorn worker runs one loop; every accepted message is a task on it, so hundreds of
slow agent calls cost sockets, not threads, and the webhook answers as soon as the trace
row is committed.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Coroutine

import aiohttp


class LoopThread:
    """An event loop thread with one shared HTTP client session for the upstream calls."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """Start the thread (in the worker process, after fork) and wait for the loop."""
        self._thread = threading.Thread(target=self._run, name="omni-pipeline", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._open_session())
        self._ready.set()
        loop.run_forever()
        # Chores and anything left: cancel and let them unwind before closing.
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        if self._session is not None:
            loop.run_until_complete(self._session.close())
        loop.close()

    async def _open_session(self) -> None:
        # No per-host cap: the in-flight bound already limits concurrency.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False,
                                              timeout=aiohttp.ClientTimeout(total=None, connect=10))

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP client session of the upstream calls (open once the loop runs)."""
        assert self._session is not None, "LoopThread.start() first"
        return self._session

    def spawn(self, coro: Coroutine) -> None:
        """Run a coroutine as a task on the loop (callable from any thread)."""
        assert self._loop is not None, "LoopThread.start() first"
        self._loop.call_soon_threadsafe(self._create_task, coro)

    def _create_task(self, coro: Coroutine) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def running(self) -> bool:
        """True while the loop runs."""
        return self._loop is not None and self._loop.is_running()

    def cancel_tasks(self) -> None:
        """Cancel every spawned task (their own handlers record what was interrupted)."""
        if self.running:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(lambda: [t.cancel() for t in list(self._tasks)])

    def stop(self) -> None:
        """Stop the loop and wait for the thread."""
        if self.running:
            assert self._loop is not None and self._thread is not None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
