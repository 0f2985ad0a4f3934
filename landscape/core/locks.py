"""One writer per output directory: an advisory lock held while a command writes there.

``locked_output(directory)`` takes an exclusive ``flock`` on ``directory/.landscape.lock`` (created with the
directory if needed) and refuses, with one line, a second process that wants the same directory. The kernel drops
the lock when the holder exits, however it exits (a ``kill -9`` included), so a stale lock never blocks a rerun.
A directory that the lock alone created is removed again on exit, so a refused command leaves nothing behind.
On a platform without ``fcntl`` (Windows) the lock is not taken. (docs/pitfalls.md §32)
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from landscape.core.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".landscape.lock"
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def locked_output(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the output lock of ``directory`` for the block; ``ConfigError`` if another process holds it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"output {directory} exists and is not a directory; expected a directory (or a new path)")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {directory}: {exc.strerror or exc}") from exc
    path = directory / LOCK_FILE
    try:
        handle = open(path, "a+")  # noqa: SIM115 - held open for the duration of the block
    except OSError as exc:
        raise ConfigError(f"cannot write in the output directory {directory}: {exc.strerror or exc}") from exc
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"another landscape process is writing to {directory} (it holds {path}); "
                    "wait for it to finish or choose another output"
                ) from None
        yield directory
    finally:
        handle.close()
        if created and {p.name for p in directory.iterdir()} <= {LOCK_FILE}:
            path.unlink(missing_ok=True)
            directory.rmdir()


def locks_output(argument: str = "out") -> Callable[[F], F]:
    """Decorator: the call holds :func:`locked_output` on its ``argument`` (a path) from start to end."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            with locked_output(bound.arguments[argument]):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
