"""Scratch folders of processes that can be killed: a search's trials, Ray Train's workers, a server's home.

A process killed outright (SIGKILL, the OOM killer, a lost Ray node) runs none of its own clean-up, and a
`TemporaryDirectory` it held stays in the temp folder for good; a trial's holds its last checkpoint. So each
folder is named after its machine and process, `<tmp>/<prefix><host>-<pid>-XXXXXXXX`, and making one first
removes the folders of the same prefix whose process on this machine has ended: what a killed run left goes
when the next one starts there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


def running(pid: int) -> bool:
    """Whether process `pid` of this machine is alive (a zombie is not: it ran its last)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a killed process whose parent has not reaped it (a container without an init) is a zombie
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux), or it ended just now
        return True


def owner(name: str, prefix: str, host: str) -> int | None:
    """The process id in the name of a folder that `make` made with `prefix` on `host`; else None."""
    found = re.fullmatch(rf"{re.escape(prefix)}{re.escape(host)}-(\d+)-[a-z0-9_]{{8}}", name)  # mkdtemp's 8
    return int(found[1]) if found else None


def sweep(prefix: str, root: Path | None = None) -> None:
    """Remove the `prefix` folders under `root` (the temp folder) of this machine's ended processes."""
    host = socket.gethostname()
    for folder in Path(root or tempfile.gettempdir()).glob(f"{prefix}{host}-*"):
        pid = owner(folder.name, prefix, host)
        if pid is not None and not running(pid):
            shutil.rmtree(folder, ignore_errors=True)


def make(prefix: str, root: Path | None = None) -> Path:
    """A new folder of this process, `<root>/<prefix><host>-<pid>-XXXXXXXX`, made after a `sweep`."""
    sweep(prefix, root)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-", dir=root))


@contextlib.contextmanager
def folder(prefix: str, root: Path | None = None) -> Iterator[Path]:
    """`make`'s folder, removed when the block ends (the sweep removes it when the process is killed instead)."""
    path = make(prefix, root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
