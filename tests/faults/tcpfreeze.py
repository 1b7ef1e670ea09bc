"""A TCP proxy that black-holes its connections on demand, as a lost NAT or load-balancer
entry or a hung middlebox does: no RST, no FIN, neither side ever learns.

``freeze()`` stops forwarding on every flow open at that moment, in both directions, and
keeps both of its sockets open until the proxy itself stops: whatever either side sends
afterwards is never passed on, and a side that gives up and closes is not passed on either
(the other side still believes the flow alive). Flows opened afterwards are served
normally, so a client that drops a dead connection and opens a new one gets through.

A ``watch`` factory can give each flow an observer of the bytes its client sends (what the
flow carries, e.g. which Kafka requests), so a test can tell which flows it froze.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

_CHUNK = 64 * 1024


class Watcher(Protocol):
    """Sees every byte a flow's client sends, in order, before it is forwarded."""

    def feed(self, data: bytes) -> None: ...


@dataclass(eq=False)
class Flow:
    """One client connection (from ``client_port``) and its connection to the server."""

    client_port: int
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    watcher: Watcher | None
    frozen: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class FreezingProxy:
    """Proxies ``upstream_host:upstream_port`` on a free loopback port (``address``)."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        watch: Callable[[], Watcher] | None = None,
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._watch = watch
        self._server: asyncio.Server | None = None
        self._closing = False
        self._handlers: set[asyncio.Task[None]] = set()
        self.flows: list[Flow] = []
        self.port = 0

    @property
    def address(self) -> str:
        """``host:port`` for clients."""
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._closing = True
        self._server.close()
        # The pumps are cancelled and the handlers left to end on their own: asyncio reports
        # a cancelled connection handler as an unhandled error.
        pumps = [p for f in self.flows for p in f.pumps]
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, *self._handlers, return_exceptions=True)
        for f in self.flows:
            _close(f.client)
            _close(f.server)
        self.flows.clear()

    def open_flows(self) -> list[Flow]:
        """The flows that are open and forwarding now."""
        return [f for f in self.flows if not f.frozen]

    def freeze(self) -> list[Flow]:
        """Black-hole every flow open now (see the module docstring); returns them.

        Atomic on the event loop: the pumps are cancelled before any of them runs again, so
        not one byte read from now on is forwarded."""
        frozen = self.open_flows()
        for f in frozen:
            f.frozen = True
            for p in f.pumps:
                p.cancel()
        return frozen

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self._upstream)
            except OSError:
                _close(client_w)
                return
            if self._closing:
                _close(client_w)
                _close(server_w)
                return
            flow = Flow(
                client_w.get_extra_info("peername")[1],
                client_w,
                server_w,
                self._watch() if self._watch is not None else None,
            )
            self.flows.append(flow)
            flow.pumps = [
                asyncio.create_task(_pump(client_r, server_w, flow.watcher)),
                asyncio.create_task(_pump(server_r, client_w, None)),
            ]
            # A flow ends when either side closes, unless it was frozen first: then nothing
            # is closed here, the pumps are only cancelled.
            await asyncio.wait(flow.pumps, return_when=asyncio.FIRST_COMPLETED)
            if not flow.frozen:
                for p in flow.pumps:
                    p.cancel()
                await asyncio.gather(*flow.pumps, return_exceptions=True)
                _close(client_w)
                _close(server_w)
                self.flows.remove(flow)
        finally:
            self._handlers.discard(task)


async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, watcher: Watcher | None) -> None:
    with contextlib.suppress(OSError):
        while data := await r.read(_CHUNK):
            if watcher is not None:
                watcher.feed(data)
            w.write(data)
            await w.drain()


def _close(w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        w.close()
