"""The fault rig's buyer socket (tests/fault_rig.py ``_Socket``) counts only what a
client that still uses the socket would hear. The fault tests assert that every buyer
hears their order's outcome exactly once, summed over the buyer's sockets: a socket the
client gave up on must not go on hearing, or a buyer who reconnected in a fault is
counted twice for one event its server rightly sent to two open sockets.

Both sides are bare ``websockets`` here: what is under test is the rig's client."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import websockets

from tests.fault_rig import _Socket

pytestmark = pytest.mark.timeout(30)

PAID = {"t": "private", "event": "order.paid", "data": {"order_id": "o-1"}}


@contextlib.asynccontextmanager
async def _joined(handler):
    """A bare server running ``handler`` and the rig's socket joined to it: (the
    socket, the private events it heard)."""
    heard: list[tuple[str, dict]] = []
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield await _Socket.open(f"ws://127.0.0.1:{port}", "token", 1,
                                 lambda e, d: heard.append((e, d))), heard


async def test_a_socket_whose_join_timed_out_is_closed_and_hears_nothing():
    """A join that never got its answer: open() raises and the socket is closed, so an
    event the server sends it later is not heard (before, the socket lived on)."""
    gone = asyncio.get_running_loop().create_future()

    async def never_answers_join(ws):
        await ws.recv()  # the join
        await asyncio.sleep(0.5)  # the client has given up by now
        try:
            await ws.send(json.dumps(PAID))
            await ws.wait_closed()
        finally:
            if not gone.done():
                gone.set_result(ws.close_code)

    heard: list[tuple[str, dict]] = []
    async with websockets.serve(never_answers_join, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(TimeoutError):
            await _Socket.open(f"ws://127.0.0.1:{port}", "token", 1,
                               lambda e, d: heard.append((e, d)), join_wait=0.2)
        code = await asyncio.wait_for(gone, 5)
    assert code is not None  # the client closed it
    assert heard == []


async def test_what_arrives_while_the_client_closes_a_socket_is_not_heard():
    """close() was called with a frame already on its way: it is the server's to
    send and nobody's to hear. The client's reading is paused so that the frame is
    surely read after close() began."""
    joined, release, sent = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def answers_then_sends(ws):
        message = json.loads(await ws.recv())
        await ws.send(json.dumps({"t": "joined", "id": message["id"]}))
        joined.set()
        await release.wait()
        await ws.send(json.dumps(PAID))
        sent.set()
        await ws.wait_closed()

    async with _joined(answers_then_sends) as (sock, heard):
        await joined.wait()
        sock.ws.transport.pause_reading()
        release.set()
        await asyncio.wait_for(sent.wait(), 5)  # in the client's socket buffer, unread
        closing = asyncio.create_task(sock.close())
        await asyncio.sleep(0.05)  # close() began: the close frame is written
        sock.ws.transport.resume_reading()
        await asyncio.wait_for(closing, 5)
    assert sock.closing
    assert heard == []


async def test_an_open_socket_hears_its_private_events():
    """The other side of the two above: a socket in use hears what it is sent."""
    async def answers_and_sends(ws):
        message = json.loads(await ws.recv())
        await ws.send(json.dumps({"t": "joined", "id": message["id"]}))
        await ws.send(json.dumps(PAID))
        await ws.wait_closed()

    async with _joined(answers_and_sends) as (sock, heard):
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        await sock.close()
    assert heard == [("order.paid", {"order_id": "o-1"})]
