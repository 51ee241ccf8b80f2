"""What a domain package hands to the app: its routes and lifecycle hooks.

Each of ``realtime``, ``drops``, ``checkout`` and ``streaming`` exposes a
``component`` built from this class; :func:`dropserver.app.create_app` mounts them in
order. Hooks get the Starlette app and keep their objects on ``app.state``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.routing import BaseRoute

# Registers the ``id`` path convertor (``{drop_id:id}``) every route module uses.
import dropserver.http  # noqa: F401

Hook = Callable[[Starlette], Awaitable[None]]

__all__ = ["Component", "Hook", "combine"]


@dataclass(frozen=True)
class Component:
    name: str
    routes: Sequence[BaseRoute] = ()
    # Called in order after the shared pools exist, and in reverse on shutdown.
    startup: Hook | None = None
    shutdown: Hook | None = None
    # Called first when the process is asked to stop: stop taking new work and tell
    # clients when to come back. Runs before uvicorn closes connections.
    drain: Hook | None = None
    extra: dict[str, object] = field(default_factory=dict)


def combine(name: str, *parts: Component) -> Component:
    """One component from several parts of a package (hooks run in part order)."""

    def chain(attr: str, reverse: bool = False) -> Hook | None:
        hooks = [getattr(p, attr) for p in parts if getattr(p, attr) is not None]
        if not hooks:
            return None
        ordered = list(reversed(hooks)) if reverse else hooks

        async def run(app: Starlette) -> None:
            for hook in ordered:
                await hook(app)

        return run

    return Component(
        name=name,
        routes=[r for p in parts for r in p.routes],
        startup=chain("startup"),
        shutdown=chain("shutdown", reverse=True),
        drain=chain("drain"),
    )
