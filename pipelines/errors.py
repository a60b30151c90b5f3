"""The one error type users see, and the stage entry point that prints it as one line."""

from __future__ import annotations

import functools
import sys
from typing import Callable


from models._errors import ConvForgeError

__all__ = ["ConvForgeError", "stage_entry"]


def stage_entry(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's `main()`: a ConvForgeError becomes `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper() -> None:
        try:
            main()
        except ConvForgeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
