"""The creator's side of a rehearsal: drive one drop through the HTTP API.

create (draft) -> schedule (countdown) -> live (stock pre-warmed) -> buy-now (BUY NOW
to every viewer) -> [sold out happens by itself] -> end. Every call is timed with
``time.monotonic()`` right before the request leaves, which is the reference point of
the BUY NOW fan-out latency (all processes of a local rehearsal share the clock).

:class:`ControlPathProbe` drives five more drops the same way, over and over, on an
open schedule, to time the creator's requests while the workers fan out the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

__all__ = ["ControlPathProbe", "CreatorClient", "CreatorError"]


class CreatorError(RuntimeError):
    """The API refused a lifecycle call; carries the status and the error body."""

    def __init__(self, what: str, response: httpx.Response) -> None:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text[:500]
        super().__init__(f"{what}: HTTP {response.status_code} {body}")
        self.status = response.status_code
        self.body = body


class CreatorClient:
    """Lifecycle calls for one drop, as its creator."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout,
            headers={"authorization": f"Bearer {token}"},
        )
        self.drop_id: int | None = None
        self.product_ids: list[int] = []
        self.calls: dict[str, float] = {}  # call name -> monotonic send time
        self.durations_ms: dict[str, float] = {}  # call name -> time to the response

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, name: str, path: str, body: dict[str, Any],
                    ok: tuple[int, ...] = (200, 201)) -> dict[str, Any]:
        self.calls[name] = time.monotonic()
        resp = await self._http.post(path, json=body)
        self.durations_ms[name] = round((time.monotonic() - self.calls[name]) * 1000, 1)
        if resp.status_code not in ok:
            raise CreatorError(name, resp)
        return resp.json()

    async def create(self, *, title: str, units: int, price: int = 2500,
                     currency: str = "usd", products: int = 1,
                     variants: int = 0) -> dict[str, Any]:
        """A drop of ``products`` products of ``units`` each; with ``variants``, each
        product comes in that many sizes sharing its units (the last one dearer)."""
        items: list[dict[str, Any]] = []
        for i in range(products):
            item: dict[str, Any] = {"title": f"{title} item {i + 1}", "price": price,
                                    "units": units}
            if variants:
                item["variants"] = [
                    {"options": {"size": f"size {v + 1}"},
                     "units": units // variants + (1 if v < units % variants else 0),
                     **({"price": price + 500} if v == variants - 1 else {})}
                    for v in range(variants)]
            items.append(item)
        body = {"title": title, "currency": currency, "products": items}
        drop = await self._post("create", "/v1/drops", body)
        self.drop_id = int(drop["id"])
        self.product_ids = [int(p["product_id"]) for p in drop["products"]]
        return drop

    def _path(self, action: str) -> str:
        if self.drop_id is None:
            raise RuntimeError("create the drop first")
        return f"/v1/drops/{self.drop_id}/{action}"

    async def schedule(self, starts_in: float) -> dict[str, Any]:
        starts_at = datetime.now(UTC) + timedelta(seconds=max(starts_in, 1.0))
        return await self._post("schedule", self._path("schedule"),
                                {"starts_at": starts_at.isoformat()})

    async def go_live(self) -> dict[str, Any]:
        return await self._post("live", self._path("live"), {})

    async def buy_now(self, product_id: int | None = None) -> dict[str, Any]:
        pid = product_id if product_id is not None else self.product_ids[0]
        return await self._post("buy_now", self._path("buy-now"), {"product_id": pid})

    async def open_giveaway(self, *, prize: str, winners: int,
                            duration_s: int) -> dict[str, Any]:
        """Open a giveaway in the drop (a prize in text: no stock is taken)."""
        return await self._post("giveaway", self._path("giveaways"), {
            "prize": prize, "winners": winners, "duration_s": duration_s}, ok=(201,))

    async def close(self) -> dict[str, Any]:
        return await self._post("close", self._path("close"), {})

    async def end(self) -> dict[str, Any]:
        return await self._post("end", self._path("end"), {})

    async def get(self) -> dict[str, Any]:
        if self.drop_id is None:
            raise RuntimeError("create the drop first")
        resp = await self._http.get(f"/v1/drops/{self.drop_id}")
        if resp.status_code != 200:
            raise CreatorError("get", resp)
        return resp.json()


class ControlPathProbe:
    """The creator's control path under load: ``DROPS`` drops with no viewers (so no
    fan-out of their own), each taken through BUY NOW and close over and over; every
    request is timed. A worker stuck behind a fan-out answers late, whichever drop it
    is.

    The schedule is open: a request is due every ``interval`` seconds, the drops take
    turns, and a slow answer holds up only its own drop. With one drop, one request
    after another, a server answering in 5 s would have been probed once in a 7 s
    window, and the probe cancelled at the end of the window (the slowest) was never
    counted: few samples, and the slow ones missing. Here every request started is
    awaited at the end (up to the client's timeout) and counted, as an answer or as
    an error; ``due`` counts the requests the schedule asked for, so that fewer
    started (drops still waiting for answers) shows."""

    DROPS = 5
    PRODUCTS = 50  # the most a drop may have: 100 probes per drop

    def __init__(self, base_url: str, token: str) -> None:
        self.clients = [CreatorClient(base_url, token) for _ in range(self.DROPS)]
        self.latencies: list[float] = []
        self.errors = 0
        self.started = 0
        self.due = 0
        self._interval = 0.0
        self._first = 0.0
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()

    async def prepare(self) -> None:
        for c in self.clients:
            await c.create(title="Rehearsal control-path probe", units=1000,
                           products=self.PRODUCTS)
            await c.schedule(starts_in=3600)
            await c.go_live()

    def start(self, interval: float) -> None:
        """Probe every ``interval`` seconds (all drops together) until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        first, n = loop.time() + interval, len(self.clients)
        self._first, self._interval = first, interval
        self._tasks = [loop.create_task(self._drop(c, first + k * interval, n * interval))
                       for k, c in enumerate(self.clients)]

    async def stop(self, wait_s: float = 35.0) -> None:
        """No new requests; wait for those in flight (they are counted)."""
        self._stop.set()
        if not self._tasks:
            return
        now = asyncio.get_running_loop().time()
        self.due = max(0, math.floor((now - self._first) / self._interval) + 1)
        _, pending = await asyncio.wait(self._tasks, timeout=wait_s)
        for task in pending:  # past the client's own timeout: count it as failed
            task.cancel()
            self.errors += 1
        await asyncio.gather(*pending, return_exceptions=True)

    async def _drop(self, c: Any, due: float, every: float) -> None:
        loop = asyncio.get_running_loop()
        for product in c.product_ids:
            for action in ("buy_now", "close"):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, due - loop.time())):
                        await self._stop.wait()
                if self._stop.is_set():
                    return
                due = max(due + every, loop.time())
                self.started += 1
                started = time.monotonic()
                try:
                    if action == "buy_now":
                        await c.buy_now(product)
                    else:
                        await c.close()
                except Exception:
                    self.errors += 1
                    continue
                self.latencies.append(time.monotonic() - started)

    async def aclose(self) -> None:
        for task in self._tasks:  # the run ended early (an error): nothing to count
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.clients:
            await c.aclose()
