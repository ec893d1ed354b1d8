"""Progress of long work: counted steps, with the time left.

Code that loops over long steps (kernels to build, kernel variants to time, layers to refit,
groups to measure) makes a :class:`Progress` from the ``log`` it was given and calls
:meth:`Progress.step`; it never decides how progress looks. That is the ``log``'s business:

* the CLI's :class:`Log` on a terminal shows a tqdm bar (done/total, elapsed, time left) on
  stderr, log lines printed above it;
* any other ``log`` callable (the CLI's when stderr is a pipe or a file, or a user's
  ``log=print``) gets plain lines, at most one every ``every`` seconds, and none for a loop
  that ends sooner;
* with ``-q`` the CLI's log is silent, bars included.

Work that happens inside TVM's passes has no ``log`` argument: :func:`reporting` makes a log
the current one for a block and :func:`current` returns it (a context variable, so threads
and nested compiles keep their own).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import IO, Callable

LogFn = Callable[[str], None]


class Log:
    """The CLI's log: lines to ``stream`` (stderr), nothing when ``quiet``. ``terminal`` (by
    default: whether ``stream`` is a terminal) turns :class:`Progress` into a bar."""

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False,
                 terminal: bool | None = None) -> None:
        self.stream = stream if stream is not None else _own_stderr()
        self.quiet = quiet
        if terminal is None:
            terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.terminal = terminal and not quiet
        self._bar = None          # the bar on screen, which log lines must not tear

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)


def _own_stderr() -> IO[str]:
    """stderr through a descriptor of its own: TVM's native log lines are captured by pointing
    fd 2 elsewhere while a model compiles (``backend.native_stderr_to``), and progress must
    still reach the screen then. ``sys.stderr`` itself where it has no descriptor (pytest's
    capture)."""
    import os

    try:
        fd = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return sys.stderr
    return open(fd, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None),
                errors="replace")


def _quiet(msg: str) -> None:
    pass


class Progress:
    """Counted steps of long work, reported through ``log`` (module docstring). Use as a
    context manager, or call :meth:`close` when the work ends."""

    def __init__(self, log: LogFn | None, what: str, total: int, unit: str,
                 every: float = 3.0) -> None:
        self.log = log if log is not None else _quiet
        self.what, self.total, self.unit, self.every = what, int(total), unit, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if isinstance(self.log, Log) and self.log.terminal and self.total > 0 \
                and self.log._bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=what, unit=f" {unit}", file=self.log.stream,
                            leave=False, mininterval=min(every, 0.25),
                            bar_format="{desc}: {bar} {n_fmt}/{total_fmt}{unit} "
                                       "[{elapsed} elapsed, {remaining} left]{postfix}")
            self.log._bar = self.bar

    def step(self, n: int = 1, detail: str = "") -> None:
        """``n`` more steps done; ``detail`` says what the last one was (a kernel's name)."""
        self.done += n
        if self.bar is not None:
            if detail:
                self.bar.set_postfix_str(detail, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            left = (now - self.start) / self.done * (self.total - self.done)
            self.log(f"  {self.what}: {self.done}/{self.total} {self.unit}, "
                     f"{now - self.start:.0f} s, about {left:.0f} s left"
                     + (f" ({detail})" if detail else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if isinstance(self.log, Log) and self.log._bar is self.bar:
                self.log._bar = None
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CURRENT: contextvars.ContextVar[LogFn] = contextvars.ContextVar("sparsec_log",
                                                                 default=_quiet)


@contextlib.contextmanager
def reporting(log: LogFn | None):
    """Within the block, :func:`current` is ``log`` (for work inside TVM's passes)."""
    token = _CURRENT.set(log if log is not None else _quiet)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> LogFn:
    """The log of the innermost :func:`reporting` block (silent outside any)."""
    return _CURRENT.get()


__all__ = ["Log", "Progress", "current", "reporting"]
