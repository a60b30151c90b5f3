"""Scratch folders: named after their machine and process, and swept once that process has ended, however."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipelines import scratch

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "convforge-test-"


def made_by_child(root: Path, then: str) -> tuple[subprocess.Popen, Path]:
    """A child process that makes a scratch folder under `root`, prints its path and then runs `then`."""
    code = (f"from pipelines import scratch; import time; print(scratch.make({PREFIX!r}, {str(root)!r}), "
            f"flush=True); {then}")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    return child, Path(child.stdout.readline().strip())


def test_a_folder_is_named_after_its_machine_and_process_and_removed_after_its_block(tmp_path):
    with scratch.folder(PREFIX, tmp_path) as path:
        assert path.parent == tmp_path and path.is_dir()
        assert scratch.owner(path.name, PREFIX, socket.gethostname()) == os.getpid()
        (path / "last.pt").write_bytes(b"x")
    assert not path.exists()


def test_the_folders_of_a_killed_process_go_when_the_next_is_made_and_the_living_stay(tmp_path):
    killed, orphan = made_by_child(tmp_path, "time.sleep(60)")
    living, kept = made_by_child(tmp_path, "time.sleep(60)")
    try:
        (orphan / "last.pt").write_bytes(b"x")  # what a SIGKILLed trial leaves: its clean-up never runs
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        assert orphan.is_dir()
        host = socket.gethostname()
        elsewhere = tmp_path / f"{PREFIX}{host}-2-{killed.pid}-abcd1234"  # machine `<host>-2`'s, on a shared disk
        other = tmp_path / f"convforge-other-{host}-{killed.pid}-abcd1234"  # another prefix
        for path in (elsewhere, other):
            path.mkdir()

        made = scratch.make(PREFIX, tmp_path)

        assert not orphan.exists()
        assert kept.is_dir() and made.is_dir() and elsewhere.is_dir() and other.is_dir()
    finally:
        for child in (killed, living):
            child.kill()
            child.wait()
