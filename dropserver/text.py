"""What counts as text here (pure): a string PostgreSQL and Redis can both store.

PostgreSQL refuses NUL in ``text``; an unpaired surrogate (``"\\ud800"``, which JSON
lets a client write as an escape) cannot be encoded as UTF-8 at all, so redis-py and
asyncpg fail on it. Every string from a client (HTTP bodies, WebSocket frames) is
checked with :func:`text_problem` before anything stores it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["find_bad_text", "text_problem"]


def text_problem(value: str) -> str | None:
    """Why ``value`` is not storable text, or None when it is."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain unpaired surrogates (not valid Unicode text)"
    return None


def find_bad_text(data: Any) -> tuple[str, str] | None:
    """``(path, problem)`` of the first string in a decoded JSON value (keys too) that
    is not storable text; paths look like ``products[1].title``. Iterative: however
    deep ``json.loads`` let it be."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem is not None:
                return path or "body", problem
        elif isinstance(value, dict):
            for key, item in value.items():
                sub = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and text_problem(key) is not None:
                    return path or "body", "has a field name that " + str(text_problem(key))
                stack.append((sub, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None
