"""Watch a drop from the terminal: join over /ws and print every frame as JSON.

    python -m realtime.watch ws://127.0.0.1:8000/ws 1 [--token JWT]

Answers the server's heartbeats, and on a lost connection reconnects with its last
position (``since``) after the delay a ``going_away`` frame asked for, or a jittered
backoff: a small reference client for docs/protocol.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from typing import Any

import websockets

from realtime.protocol import Format

__all__ = ["watch"]


async def watch(url: str, drop_id: int, token: str | None = None, *, once: bool = False,
                out: Any = sys.stdout) -> None:
    since: dict[str, Any] | None = None
    backoff = 0.5
    while True:
        delay = None
        try:
            async with websockets.connect(url, subprotocols=[Format.JSON.value],
                                          compression=None) as ws:
                join: dict[str, Any] = {"t": "join", "id": "join", "drop_id": drop_id}
                if token:
                    join["token"] = token
                if since:
                    join["since"] = since
                await ws.send(json.dumps(join))
                async for raw in ws:
                    message = json.loads(raw)
                    # a batch is a list of frames, in order (docs/protocol.md)
                    for frame in message if isinstance(message, list) else [message]:
                        print(json.dumps(frame, ensure_ascii=False), file=out, flush=True)
                        kind = frame.get("t")
                        if kind == "ping":
                            await ws.send('{"t": "pong"}')
                        elif kind == "going_away":
                            delay = frame.get("reconnect_after_ms", 1000) / 1000
                        elif kind == "joined":
                            backoff = 0.5
                        pos = frame.get("pos") if kind in ("event", "joined", "skipped") \
                            else None
                        if pos:
                            since = pos
        except (OSError, websockets.WebSocketException) as exc:
            print(json.dumps({"watch": "disconnected", "error": str(exc)}), file=out,
                  flush=True)
        if once:
            return
        if delay is None:
            delay = random.uniform(0, backoff)
            backoff = min(backoff * 2, 30.0)
        await asyncio.sleep(delay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="ws://host:port/ws")
    parser.add_argument("drop_id", type=int)
    parser.add_argument("--token", default=None, help="a JWT (optional: guests may watch)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(watch(args.url, args.drop_id, args.token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
