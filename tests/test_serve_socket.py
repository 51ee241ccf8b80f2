"""The listening socket the server binds (dropserver.serve.bind_socket) hands asyncio
connections it can set TCP_NODELAY on.

asyncio turns Nagle's algorithm off only for sockets whose ``proto`` is
``IPPROTO_TCP``; an accepted socket inherits ``proto`` from the listening one. A
listening socket made with proto 0 left every connection with Nagle on: a response
written in two pieces on a kept-alive connection waited for the client's delayed ACK
(~40 ms on Linux), and a WebSocket message written while the previous one was
unacknowledged waited the same."""

from __future__ import annotations

import asyncio
import socket

from dropserver.serve import bind_socket


async def test_accepted_connections_have_nagle_off():
    sock = bind_socket("127.0.0.1", 0, reuse_port=False)
    nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nodelay.set_result(writer.get_extra_info("socket").getsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)
    try:
        _reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(nodelay, 5) == 1
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
