"""How the command line fails: one plain line per error, a non-zero exit code, a bounded exit.

- The project's own errors (a broken model file, a refused run, a bad value, a missing path,
  an unreachable service) and every failed write (a read-only folder, a full disk, a size
  limit, a closed pipe on stdout) become one line on stderr and exit code 1; the traceback
  shows only with ``gaussian-ad --debug`` or ``GAUSSIAN_AD_LOG_LEVEL=DEBUG``.
- What the command printed is flushed and checked before it counts as a success: a table
  cut short on stdout exits non-zero.
- Ctrl-C (SIGINT) and SIGTERM end the process within :data:`EXIT_GRACE` seconds: the
  command's own clean-up runs first (temporary server drained and stopped, temporary files
  removed, the Dask workers' reports of their lost scheduler left unsaid), then the process
  exits without the interpreter's own slow shutdown; whatever still holds on after the
  grace is cut off. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperGroup

DEBUG_ENV = "GAUSSIAN_AD_DEBUG"
LOG_LEVEL_ENV = "GAUSSIAN_AD_LOG_LEVEL"
EXIT_GRACE = float(os.environ.get("GAUSSIAN_AD_EXIT_GRACE", 5))
"""Seconds from Ctrl-C or SIGTERM to the process's exit, whatever is still running."""
STDOUT = "stdout"
INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}
QUIET_AFTER_INTERRUPT = ("distributed",)
"""Libraries whose log records while stopping after an interrupt are its effect, not news:
the local Dask cluster's workers report the scheduler they lost, with a traceback."""


class CommandError(Exception):
    """A problem the user can fix, said in one line (and the exit code to leave with)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread (a KeyboardInterrupt: flows treat it so)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def debugging() -> bool:
    """True when tracebacks were asked for (``--debug`` or a DEBUG log level)."""
    level = os.environ.get(LOG_LEVEL_ENV, "").upper()
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or level == "DEBUG"


def describe(error: BaseException) -> str:
    """One line (the first of the message) that says what went wrong and where."""
    if isinstance(error, OSError) and error.strerror:
        where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        name = errno.errorcode.get(error.errno or 0, "")
        reason = f"{error.strerror} ({name})" if name else error.strerror
        return f"{where}: {reason}" if where else reason
    text = str(error).strip()
    if isinstance(error, KeyError):  # str() of a KeyError is the repr of its key
        text = f"{type(error).__name__}: {text}"
    if not text:
        text = type(error).__name__
    return text


def _expected(error: BaseException) -> bool:
    """The project's own errors and the environment's: said plainly, no traceback needed."""
    from gaussian_ad.stats.arrayfile import ModelFileError

    return isinstance(error, CommandError | ModelFileError | ValueError | OSError | RuntimeError)


def _say(message: str) -> None:
    """``message`` on stderr; a closed stderr is not an error worth another one."""
    with contextlib.suppress(OSError, ValueError):
        typer.secho(message, fg="red", err=True)
        sys.stderr.flush()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def write_stdout(text: str) -> None:
    """``text`` and a newline on stdout, all of it or an OSError: a size limit or a full
    disk cuts a buffered write short without an error, so the bytes are written and counted
    here (with click's own echo where stdout is no file, as under a test runner)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        typer.echo(text)
        return
    data = memoryview(f"{text}\n".encode(sys.stdout.encoding or "utf-8", errors="replace"))
    with _naming_stdout():
        sys.stdout.flush()
        while data:
            data = data[os.write(fd, data) :]


def check_stdout() -> None:
    """Flush stdout; a failed flush (full disk, size limit, closed pipe) raises OSError."""
    with _naming_stdout():
        sys.stdout.flush()


@contextlib.contextmanager
def _naming_stdout() -> Iterator[None]:
    """Write errors on stdout name it as their file."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise type(error)(error.errno, error.strerror, STDOUT) from error


@contextlib.contextmanager
def plain_errors() -> Iterator[None]:
    """Run a command: errors become one line on stderr and an exit code (see the module)."""
    # A file size limit (ulimit -f) makes write() fail with EFBIG instead of killing us
    # (CPython ignores SIGXFSZ from the start; an embedding program may not).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
        check_stdout()
    except (typer.Exit, typer.Abort, typer.TyperException, SystemExit):  # typer's own exits
        raise
    except Interrupted as interrupt:
        _say(f"interrupted ({interrupt}); what was finished is kept: rerun to continue")
        # The command's clean-up has run; the interpreter's own (atexit handlers, threads
        # of the libraries) can take 10 s more, and the deadline's timer cannot fire then.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os._exit(INTERRUPTED[interrupt.signum])
    except KeyboardInterrupt:
        _say("interrupted; what was finished is kept: rerun to continue")
        raise typer.Exit(130) from None
    except Exception as error:
        if isinstance(error, OSError) and error.filename == STDOUT:
            _silence_stdout()
        if debugging():
            with contextlib.suppress(OSError, ValueError):
                traceback.print_exception(error, file=sys.stderr)
        code = getattr(error, "exit_code", 1)
        if _expected(error):
            _say(f"error: {describe(error)}")
        else:
            _say(
                f"error: {type(error).__name__}: {describe(error)} (an unexpected error; "
                "gaussian-ad --debug shows where)"
            )
        raise typer.Exit(code) from None


class PlainErrorsGroup(TyperGroup):
    """The ``gaussian-ad`` command group: every command runs under :func:`plain_errors`."""

    def invoke(self, ctx: Any) -> Any:
        with plain_errors():
            return super().invoke(ctx)


def _quiet_teardown() -> None:
    """Only critical records from :data:`QUIET_AFTER_INTERRUPT`'s loggers from now on (each
    logger set, as a library may have given its children levels of their own)."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in QUIET_AFTER_INTERRUPT:
            logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def bounded_exit(grace: float = EXIT_GRACE) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread and start a
    ``grace``-second deadline after which the process exits (130 / 143) whatever still runs;
    a second signal exits at once. Prefect's own SIGTERM handler, inside a flow, hands the
    signal back to this one once the flow run is marked crashed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = threading.Event()

    def cut_off(signum: int) -> None:
        _say(
            f"interrupted ({signal.Signals(signum).name}): still stopping after {grace:.0f} s, "
            "exiting now; what was finished is kept: rerun to continue"
        )
        os._exit(INTERRUPTED[signum])

    def handler(signum: int, frame: object) -> None:
        if armed.is_set():
            cut_off(signum)
        armed.set()
        _quiet_teardown()
        timer = threading.Timer(grace, cut_off, args=(signum,))
        timer.daemon = True
        timer.start()
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in INTERRUPTED}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
