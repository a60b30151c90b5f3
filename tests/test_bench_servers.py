"""The bench scripts that start servers (serve, upload, gpu_check) stop them when they are themselves stopped:
the servers run in their own session, so a SIGTERM to the script (`timeout`, `kill`, a cancelled job) used to end
it at once and leave them serving, ports held, with no parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines import scratch

ROOT = Path(__file__).resolve().parents[1]


def processes_in(folder: Path) -> list[int]:
    """Pids of the live processes whose environment names `folder` (the servers get their models and
    BENTOML_HOME below the script's work folder, which is below TMPDIR)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # ended meanwhile, or not ours
            continue
        pid = int(entry.name)
        if str(folder).encode() in environ and pid != os.getpid() and scratch.running(pid):
            found.append(pid)
    return found


def test_a_sigterm_to_the_script_stops_its_server_and_removes_its_work_folder(tmp_path):
    home = tmp_path / "tmp"
    home.mkdir()
    env = {**os.environ, "TMPDIR": str(home), "PYTHONUNBUFFERED": "1"}
    script = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upload.py"), "--requests", "100000",
                               "--out", str(tmp_path / "out.json")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        work = []
        while time.monotonic() < deadline and script.poll() is None:
            work = list(home.glob("convforge-bench-upload-*"))
            logs = [path.read_text(errors="replace") for folder in work for path in folder.glob("*.log")]
            if any("Service convforge initialized" in log for log in logs):  # the worker has its models
                break
            time.sleep(0.5)
        assert script.poll() is None, script.stdout.read()
        assert work and len(processes_in(home)) >= 2, "the server and its worker should be up by now"
        time.sleep(2)  # the script is sending its requests
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while processes_in(home) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_in(home), "the server outlived the script"
        assert not list(home.glob("convforge-bench-upload-*")), "the work folder was left behind"
        assert not (tmp_path / "out.json").exists()
    finally:
        script.kill()
        for pid in processes_in(home):
            os.kill(pid, signal.SIGKILL)
