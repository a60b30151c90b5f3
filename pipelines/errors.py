"""The one error type users see, and the stage entry point that prints it as one line."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from typing import Callable


from models._errors import ConvForgeError

__all__ = ["ConvForgeError", "Terminated", "end_on_sigterm", "stage_entry"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a cancelled job), raised where the main thread is, so a stage ends as on Ctrl-C:
    a search marks its MLflow run KILLED (a rerun resumes it), runs and folders are closed, Ray is shut down."""


_TERMINATED: list[int] = []  # set by the handler: Ray's core re-raises what a handler raised as a KeyboardInterrupt


def _terminated(signum: int, frame: object) -> None:
    _TERMINATED.append(signum)
    raise Terminated


def end_on_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in this process (from its main thread; elsewhere signals cannot be set).
    Python's default ends the process at once; once Ray is joined, its core worker's handler prints a stack dump
    and aborts (exit -6), leaving the search's MLflow run RUNNING: `pipelines.cluster.connect` calls this again."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def stage_entry(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's `main()`: a ConvForgeError becomes `error: ...` on stderr and exit code 2; Ctrl-C and SIGTERM
    end it with one line and exit code 130 or 143."""

    @functools.wraps(main)
    def wrapper() -> None:
        end_on_sigterm()
        try:
            main()
        except ConvForgeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated) or _TERMINATED:
                print("terminated (SIGTERM)", file=sys.stderr)
                raise SystemExit(128 + signal.SIGTERM) from None
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
