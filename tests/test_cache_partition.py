"""A write one replica makes while it cannot reach Redis is never served stale by another for
long: not while the writer is cut off, not after it dies, not after the sandbox slept.

Two replicas share a real PostgreSQL and a real Redis; replica B reaches Redis through a TCP
proxy that the test closes (its connections drop, new ones are refused: a real partition, for
B only). B renames a user whose profile replica A has cached. Without help, A serves the old
name until the value's TTL (300 s). The note B leaves in the database is settled by any replica
that reaches Redis (the runtime does it every CACHE_SETTLE_SECONDS), and a sandbox that wakes
with such a note settles before its first cached read.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from classroom.cache.coherent import cached_users
from classroom.cache.link import RedisService
from classroom.config import Settings
from classroom.demos.caching import create_cache_demo_user, rename_user
from classroom.sandboxes.registry import SandboxRegistry
from classroom.sandboxes.sandbox import new_sandbox_id
from source import HIT as CACHE_HIT


class RedisProxy:
    """A TCP proxy to a Redis server that can be cut: every connection through it is closed,
    and new ones are refused."""

    def __init__(self, redis_url: str) -> None:
        target = urlsplit(redis_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.database = target.path or "/0"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.listener.getsockname()[1]}{self.database}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # cut: the listener is closed
                return
            server = socket.create_connection(self.target)
            with self.lock:
                self.connections += [client, server]
            for source_socket, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source_socket, sink), daemon=True).start()

    @staticmethod
    def _pipe(source_socket: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source_socket.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source_socket, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()


@pytest.fixture
def proxy(real_redis_url: str) -> Iterator[RedisProxy]:
    cut_off = RedisProxy(real_redis_url)
    try:
        yield cut_off
    finally:
        cut_off.cut()


@pytest.fixture
async def replicas(settings: Settings, postgres_url: str, real_redis_url: str, proxy: RedisProxy):
    """Replica A (reaches Redis) and replica B (through the proxy), on one PostgreSQL."""
    shared = Settings(
        **{**settings.__dict__, "database_url": postgres_url, "redis_url": real_redis_url}
    )
    services = [
        await RedisService.connect(shared),
        await RedisService.connect(replace(shared, redis_url=proxy.url)),
    ]
    registries = [SandboxRegistry(shared, service) for service in services]
    try:
        yield registries
    finally:
        for registry in registries:
            await registry.close()
        for service in services:
            await service.close()


async def cached_name(registry: SandboxRegistry, sandbox_id: str, user_id: str) -> tuple:
    read = await cached_users(await registry.acquire(sandbox_id)).get_user(user_id=user_id)
    return read.outcome, read.value["name"]


async def test_a_write_one_replica_made_cut_off_from_redis_is_settled_by_another(replicas, proxy):
    replica_a, replica_b = replicas
    sandbox_id = new_sandbox_id()
    user_id = (await create_cache_demo_user(await replica_a.acquire(sandbox_id))).user_id
    await cached_name(replica_a, sandbox_id, user_id)
    assert await cached_name(replica_a, sandbox_id, user_id) == (CACHE_HIT, "Cache Demo User")
    on_b = await replica_b.acquire(sandbox_id)

    proxy.cut()  # B alone loses Redis
    await rename_user(on_b, user_id=user_id, name="Renamed While Cut Off")
    # The window: A still reaches Redis and its value, until a replica settles the note.
    assert await cached_name(replica_a, sandbox_id, user_id) == (CACHE_HIT, "Cache Demo User")

    # The runtime's 5 s pass (other tests' sandboxes in the same database may have notes too).
    assert sandbox_id in await replica_a.settle_missed_invalidations()
    outcome, name = await cached_name(replica_a, sandbox_id, user_id)
    assert name == "Renamed While Cut Off" and outcome != CACHE_HIT
    assert sandbox_id not in await replica_a.settle_missed_invalidations()  # the note is gone


async def test_a_sandbox_woken_after_a_writer_died_cut_off_reads_the_write(replicas, proxy):
    replica_a, replica_b = replicas
    sandbox_id = new_sandbox_id()
    on_a = await replica_a.acquire(sandbox_id)
    user_id = (await create_cache_demo_user(on_a)).user_id
    await cached_name(replica_a, sandbox_id, user_id)
    assert await cached_name(replica_a, sandbox_id, user_id) == (CACHE_HIT, "Cache Demo User")
    await replica_a.dormancy.sleep(on_a)  # A's sandbox sleeps: nothing of it runs on A

    on_b = await replica_b.acquire(sandbox_id)
    proxy.cut()
    await rename_user(on_b, user_id=user_id, name="Written Before B Died")
    await replica_b.close(delete_data=False)  # B goes without ever reaching Redis again

    outcome, name = await cached_name(replica_a, sandbox_id, user_id)  # wakes it on A
    assert name == "Written Before B Died" and outcome != CACHE_HIT
