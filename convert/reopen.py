"""Objects that hold open files (a checkpoint's memory maps, a statistics file, a GPTQ store) travel to other
processes (Ray tasks) by name, not by value: pickling one records how to open it again, and the receiving process
opens it once and keeps it for every later task that names it.

A file the receiving process cannot see, or sees with another size, is bad input naming the file there, so a
worker without the source (no shared storage, another copy) fails the run in one line instead of converting other
bytes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convert.errors import BadInput

_OPENED: dict[tuple, Any] = {}


def sizes(paths: list[Path]) -> tuple[tuple[str, int], ...]:
    """(path, size) of each file: what the receiving process checks before opening them."""
    return tuple((str(p), Path(p).stat().st_size) for p in paths)


def check_sizes(expected: tuple[tuple[str, int], ...]) -> None:
    """BadInput naming the first file this process cannot see as the sender saw it."""
    for path, size in expected:
        try:
            here = os.stat(path).st_size
        except OSError as e:
            raise BadInput(f"{path}: not readable on {socket.gethostname()} ({e.strerror}); a Ray worker reads "
                           f"the files where they are: shared storage, or the same path on every node") from None
        if here != size:
            raise BadInput(f"{path}: {here} bytes on {socket.gethostname()}, {size} where the run started; every "
                           f"node must see the same files")


def reopened(kind: str, opener: Callable[..., Any], expected: tuple[tuple[str, int], ...], *args) -> Any:
    """`opener(*args)`, opened once per process for the same files (and sizes), checked with `check_sizes`."""
    key = (kind, expected, args)
    if key not in _OPENED:
        check_sizes(expected)
        _OPENED[key] = opener(*args)
    return _OPENED[key]
