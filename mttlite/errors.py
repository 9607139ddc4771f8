"""The errors the command line turns into one-line messages (``cli.main``), and how.

* ``ValueError``, ``FileNotFoundError``, ``FileExistsError``: a setting or a file the user gave is
  wrong; exit code 2 (as argparse's own errors).
* :class:`Diverged`: a training diverged (``DistillationDiverged``, ``ExpertDiverged``); the message
  names the knob to turn, and what was kept; exit code 3.
* any other ``OSError`` (disk full, read-only file system, permission denied): exit code 1.
* ``KeyboardInterrupt`` (Ctrl-C): what was saved and how to resume; exit code 130.
* anything else is a bug: the traceback, then a line asking for a report; exit code 70.
"""
from __future__ import annotations

import signal
import threading

EXIT_OS = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_BUG = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class Diverged(RuntimeError):
    """A training diverged; the message says which setting to change and what state was kept."""


def one_line(message) -> str:
    """A (possibly multi-line) message on one line: ``"a:\\n  b\\n  c"`` → ``"a: b; c"``."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else f"{head}; {'; '.join(rest)}"


# -- Ctrl-C that cannot be lost --------------------------------------------------------------------
# Python prints and DROPS an exception raised while it runs a ``__del__`` method or a garbage-collector
# callback ("Exception ignored in ..."). A KeyboardInterrupt that lands there would let a long run go on
# as if Ctrl-C had never been pressed. So the command line's handler also remembers the interrupt, and
# the long loops (distillation iterations, expert epochs) call ``check_interrupt()`` between steps.
_pending = False


def _on_sigint(signum, frame):
    global _pending
    _pending = True
    raise KeyboardInterrupt


def install_interrupt_handler():
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered until ``clear_interrupt()``.

    Returns the handler it replaced (``restore_interrupt_handler`` puts it back; ``None`` off the main
    thread, where nothing is installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, _on_sigint)


def restore_interrupt_handler(previous) -> None:
    """Put back the handler ``install_interrupt_handler`` replaced, and forget any pending interrupt."""
    clear_interrupt()
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous)


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed and its exception was dropped on the way."""
    if _pending:
        raise KeyboardInterrupt


def clear_interrupt() -> None:
    global _pending
    _pending = False
