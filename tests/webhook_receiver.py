"""A real HTTP webhook receiver on loopback for the outbound webhook tests.

It speaks HTTP/1.1 over asyncio streams (keep-alive included) and, per request, either
answers 200 or misbehaves the ways real receivers do: ``"500"`` (an error answer),
``"drop"`` (the connection closed without an answer) or ``"slow"`` (no answer within
``slow_s`` seconds, past the sender's timeout). ``fail_rate`` is the share of requests
that misbehave, drawn from a seeded generator; ``modes`` the ways. Every request is
kept (headers, raw body, what it was answered) so a test can verify signatures with the
documented recipe and count what was delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    answer: str  # "200", "500", "drop", "slow"


@dataclass
class Receiver:
    fail_rate: float = 0.0
    modes: tuple[str, ...] = ("500",)
    seed: int = 7
    slow_s: float = 5.0
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def delivered(self, path: str | None = None) -> list[Request]:
        """Requests answered 200 (optionally only those to ``path``)."""
        return [r for r in self.requests
                if r.answer == "200" and (path is None or r.path == path)]

    def _choose(self) -> str:
        if self.fail_rate and self._rng.random() < self.fail_rate:
            return self._rng.choice(self.modes)
        return "200"

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                answer = self._choose()
                self.requests.append(Request(path, headers, body, answer))
                if answer == "drop":
                    return
                if answer == "slow":
                    await asyncio.sleep(self.slow_s)
                    return
                status = b"200 OK" if answer == "200" else b"500 Internal Server Error"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n"
                             b"content-type: text/plain\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
