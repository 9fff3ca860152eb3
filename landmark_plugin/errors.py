"""Errors the user causes, and how every command reports them: one message, exit status 1.

A ``UserError`` (bad input files, a configuration our checks refuse, an output directory that
cannot be written) is the user's to fix, so a Python traceback only hides the message.  Importing
``landmark_plugin`` installs ``report_user_errors`` as ``sys.excepthook``: ns-train, ns-eval,
ns-render and our own commands load this package before they run anything of ours, and an
uncaught ``UserError`` then prints ``error: <message>`` on stderr and exits with status 1.
Every other exception keeps the usual traceback.  Ranks of a multi-process run report through
``exit_rank``.  ``LANDMARK_DEBUG=1`` in the environment restores the traceback for user errors too.

Imports nothing heavy: the package's ``__init__`` imports this module.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, NoReturn, Optional, Type, TypeVar

DEBUG_VARIABLE = "LANDMARK_DEBUG"
"""Environment variable: set (to anything but '', '0') to print tracebacks of user errors."""

WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG)
"""OSError numbers that mean the user's output location cannot take the run's files."""


class UserError(ValueError):
    """An error the user causes and can fix; its message says what is wrong and where."""


class ConfigError(UserError):
    """The command line asks for something our checks refuse (e.g. more ranks than kd-tree leaves)."""


class OutputError(UserError):
    """The output directory cannot take the run's files (not writable, full); names the directory."""


def debug() -> bool:
    """Whether ``LANDMARK_DEBUG`` asks for tracebacks of user errors."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def message_of(error: BaseException) -> str:
    """The one line printed for a user error."""
    return f"error: {error}"


def say(text: str) -> None:
    """Write ``text`` and its newline to stderr in ONE write: ranks of a run share the stream, and
    ``print`` writes the end of line separately, so another rank's message could land between."""
    sys.stderr.flush()
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def report_user_errors(kind: Type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
    """``sys.excepthook``: a UserError prints its message alone (the interpreter exits with status 1)."""
    if isinstance(value, UserError) and not debug():
        say(message_of(value))
        return
    _previous_hook(kind, value, tb)


_previous_hook = sys.excepthook


def install_excepthook() -> None:
    """Install ``report_user_errors`` once (importing the package twice must not chain it twice)."""
    global _previous_hook
    if sys.excepthook is not report_user_errors:
        _previous_hook = sys.excepthook
        sys.excepthook = report_user_errors


def exit_rank(error: BaseException, prefix: str) -> NoReturn:
    """End one rank of a multi-process run after ``error``: its message (a user error) or its
    traceback, then ``os._exit(1)`` without tearing down (the process group may be broken)."""
    if isinstance(error, UserError) and not debug():
        say(f"{prefix} {message_of(error)}")
    else:
        say(f"{prefix} failed:\n{traceback.format_exc()}")
    os._exit(1)


def is_write_failure(error: BaseException) -> bool:
    """An OSError of a full, read-only or forbidden location, or torch's writer failing (it turns
    the OSError of a full disk into a RuntimeError)."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return isinstance(error, RuntimeError) and "PytorchStreamWriter" in str(error)


@contextlib.contextmanager
def writing_to(directory: Path, what: str) -> Iterator[None]:
    """Turn a write failure inside the context into an ``OutputError`` naming ``directory``."""
    try:
        yield
    except UserError:
        raise
    except (OSError, RuntimeError) as error:
        if not is_write_failure(error):
            raise
        raise OutputError(f"{directory}: cannot write {what}: {error}") from error


Writer = TypeVar("Writer", bound=Callable[..., Any])


def reports_write_failures(what: str) -> Callable[[Writer], Writer]:
    """Decorator of ``write(obj, path, ...)``: a write failure becomes an ``OutputError`` naming
    ``path``'s directory (``write`` must leave the file at ``path`` as it was when it fails)."""

    def decorate(write: Writer) -> Writer:
        @functools.wraps(write)
        def wrapped(obj: Any, path: Path, *args: Any, **kwargs: Any) -> Any:
            path = Path(path)
            with writing_to(path.parent, f"{what} {path.name} (what was written before is kept)"):
                return write(obj, path, *args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorate


def check_output_dir(directory: Path, need_bytes: int = 0) -> None:
    """``directory`` (created if missing) takes a file, and its disk has ``need_bytes`` free;
    ``OutputError`` naming it otherwise."""
    with writing_to(directory, "into it"):
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise OutputError(
            f"{directory}: {free / 2**20:,.0f} MiB free, but a checkpoint of this run needs about "
            f"{need_bytes / 2**20:,.0f} MiB: free some space or pass another --output-dir"
        )
