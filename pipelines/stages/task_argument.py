"""The `<task>` argument of the per-task stages (search, train, evaluate)."""

from __future__ import annotations

from pipelines.errors import ConvForgeError
from pipelines.tasks import TASKS


def parse_task(argv: list[str], stage: str) -> str:
    """The task argument of `python -m pipelines.stages.<stage> <task>`."""
    if len(argv) != 2 or argv[1] not in TASKS:
        raise ConvForgeError(f"usage: python -m pipelines.stages.{stage} {{{'|'.join(TASKS)}}}")
    return argv[1]
