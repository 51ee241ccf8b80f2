"""A buyer's orders over HTTP (:mod:`checkout.receipts`):

* ``GET /v1/me/orders`` -- the caller's own orders and tips as receipts, newest first;
  ``?drop_id=`` one drop's (the drop page's "My orders"), ``?kind=order|tip``,
  ``?limit=`` 1-100 (default 20), ``?cursor=`` the previous page's ``next_cursor``.
* ``GET /v1/orders/{order_id}/receipt`` -- one order's receipt: its buyer, the drop's
  creator or an admin; anyone else gets the same ``404 order_not_found`` as for an
  unknown order (as ``GET /v1/orders/{order_id}``: nothing tells a stranger that an
  order id exists).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checkout.keys import parse_hold_id
from checkout.receipts import KINDS, CursorError, decode_cursor, list_receipts, order_receipt
from dropserver.auth import require
from dropserver.component import Component
from dropserver.errors import NotFound, ValidationFailed
from dropserver.http import parse_int

__all__ = ["part"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


async def my_orders(request: Request) -> JSONResponse:
    who = await require(request)
    q = request.query_params
    limit = (parse_int(q["limit"], "limit", low=1, high=MAX_LIMIT) if "limit" in q
             else DEFAULT_LIMIT)
    drop_id = parse_int(q["drop_id"], "drop_id", low=1) if "drop_id" in q else None
    kind = q.get("kind")
    if kind is not None and kind not in KINDS:
        raise ValidationFailed(f"kind must be one of {', '.join(KINDS)}",
                               details={"field": "kind"})
    after = None
    if "cursor" in q:
        try:
            after = decode_cursor(q["cursor"])
        except CursorError as exc:
            raise ValidationFailed(str(exc), details={"field": "cursor"}) from None
    receipts, nxt = await list_receipts(request.app.state.db, who.user_id, limit=limit,
                                        drop_id=drop_id, kind=kind, after=after)
    return JSONResponse({"orders": receipts, "next_cursor": nxt})


async def receipt(request: Request) -> JSONResponse:
    who = await require(request)
    order_id = request.path_params["order_id"]
    found = (await order_receipt(request.app.state.db, order_id)
             if parse_hold_id(order_id) is not None else None)
    if found is None or not (found[1] == who.user_id or who.can_manage(found[2])):
        raise NotFound("no such order", code="order_not_found")
    return JSONResponse(found[0])


part = Component(
    name="checkout.receipts",
    routes=[Route("/v1/me/orders", my_orders, methods=["GET"]),
            Route("/v1/orders/{order_id}/receipt", receipt, methods=["GET"])],
)
