"""The creator's side of a rehearsal: drive one drop through the HTTP API.

create (draft) -> schedule (countdown) -> live (stock pre-warmed) -> buy-now (BUY NOW
to every viewer) -> [sold out happens by itself] -> end. Every call is timed with
``time.monotonic()`` right before the request leaves, which is the reference point of
the BUY NOW fan-out latency (all processes of a local rehearsal share the clock).

:class:`ControlPathProbe` drives a second drop the same way, over and over, to time
the creator's requests while the workers fan out the first.
"""

from __future__ import annotations

import asyncio
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
                     currency: str = "usd", products: int = 1) -> dict[str, Any]:
        body = {
            "title": title, "currency": currency,
            "products": [{"title": f"{title} item {i + 1}", "price": price, "units": units}
                         for i in range(products)],
        }
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
    """The creator's control path under load: a second drop, with no viewers (so no
    fan-out of its own), taken through BUY NOW and close over and over; every request
    is timed. A worker stuck behind a fan-out answers late, whichever drop it is."""

    PRODUCTS = 50  # the most a drop may have: 100 probes

    def __init__(self, creator: Any) -> None:
        self.creator = creator
        self.latencies: list[float] = []
        self.errors = 0

    async def prepare(self) -> None:
        c = self.creator
        await c.create(title="Rehearsal control-path probe", units=1000,
                       products=self.PRODUCTS)
        await c.schedule(starts_in=3600)
        await c.go_live()

    async def run(self, interval: float) -> None:
        c = self.creator
        loop = asyncio.get_running_loop()
        due = loop.time()
        for product in c.product_ids:
            for action in ("buy_now", "close"):
                due += interval
                await asyncio.sleep(max(0.0, due - loop.time()))
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
