"""A small pool of psycopg AsyncConnections (autocommit) for the API's polled reads.

The API's other database work goes through SQLAlchemy's sync pool in the threadpool; a polled
read is one statement, and the trip through the threadpool cost it more CPU than the query
(service.jobs.pg_json). This pool hands connections to coroutines on the event loop that
opened it (``open()``, in the app's lifespan); a request on another loop (a TestClient used
without its lifespan) gets a connection of its own, closed after use.

Like ``service.store.db``'s engine it pings a connection that idled longer than
``db.PING_IDLE_AFTER_S`` before handing it out, and drops one that broke or was left inside a
statement (a cancelled request) instead of reusing it.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import pq

from service.store import db


class AsyncPool:
    def __init__(self, connect: Callable[[], Any], size: int = 10) -> None:
        self._connect_fn = connect  # a coroutine function giving a new AsyncConnection
        self.size = size
        self._idle: list[tuple[psycopg.AsyncConnection, float]] = []  # LIFO: warm ones first
        self._opened = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task] = set()

    @classmethod
    def for_engine(cls, engine: Any, size: int = 10) -> AsyncPool:  # noqa: ANN401 (an Engine)
        """Connects as ``engine`` does (its URL and connect arguments, through SQLAlchemy's
        psycopg dialect), in autocommit."""
        args, kwargs = engine.dialect.create_connect_args(engine.url)

        async def connect() -> psycopg.AsyncConnection:
            return await psycopg.AsyncConnection.connect(*args, **{**kwargs, "autocommit": True})

        return cls(connect, size)

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        self._loop = None
        for conn, _ in idle:
            self._opened -= 1
            await conn.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        if asyncio.get_running_loop() is not self._loop:
            conn = await self._connect_fn()
            try:
                yield conn
            finally:
                await conn.close()
            return
        conn = await self._acquire()
        try:
            yield conn
        finally:
            self._release(conn)

    async def _acquire(self) -> psycopg.AsyncConnection:
        while self._idle:
            conn, since = self._idle.pop()
            if time.monotonic() - since < db.PING_IDLE_AFTER_S:
                return conn
            try:
                await conn.execute("SELECT 1")
                return conn
            except psycopg.Error:  # the server restarted, a proxy timed it out: a new one
                self._opened -= 1
                await conn.close()
        if self._opened < self.size:
            self._opened += 1
        else:  # wait for a connection to come back, or for a slot to open one in
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over as we were cancelled
                    self._give_back(waiter.result())
                raise
            if handed is not None:
                return handed
        try:
            return await self._connect_fn()
        except BaseException:
            self._give_back(None)
            raise

    def _release(self, conn: psycopg.AsyncConnection) -> None:
        if conn.closed or conn.broken or conn.info.transaction_status != pq.TransactionStatus.IDLE:
            if not conn.closed:  # left inside a statement (a cancelled request): not reusable
                task = self._loop.create_task(conn.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            conn = None
        self._give_back(conn)

    def _give_back(self, conn: psycopg.AsyncConnection | None) -> None:
        """A connection (or, with None, the slot of one that is gone) goes to the first
        waiter, else back to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)  # None: the waiter opens one in the slot
                return
        if conn is None:
            self._opened -= 1
        else:
            self._idle.append((conn, time.monotonic()))
