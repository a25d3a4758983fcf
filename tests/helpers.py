"""Helpers shared by the test suites (import as ``from helpers import wait_for``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2,
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``predicate`` until it returns something truthy and return that value.

    Args:
        predicate: the check; called at least once.
        timeout: bound in seconds.
        what: what is awaited, for the failure message ("job x to complete").
        interval: pause between calls in seconds.
        ignore: exception types that count as "not yet" instead of failing at once.

    Raises:
        AssertionError: ``timeout`` passed; the message names ``what`` and the last
            value or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last result: {last!r}")
        time.sleep(interval)


#: Marker for :func:`set_path`: remove the key instead of setting it.
DELETE = object()


def set_path(data: dict, path: str, value: object) -> dict:
    """Set the dotted ``path`` of ``data`` in place (``DELETE`` removes the key); returns ``data``."""
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data
