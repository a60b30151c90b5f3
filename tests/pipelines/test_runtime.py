"""Stage entry error handling and atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.errors import ConvForgeError, stage_entry
from pipelines.runtime import TELEMETRY_OFF, atomic_dir, sha256_file, write_json

ROOT = Path(__file__).resolve().parents[2]


def test_stage_entry_prints_one_line_and_exits_2(capsys):
    @stage_entry
    def main():
        raise ConvForgeError("data.dataset: no such thing")

    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: data.dataset: no such thing\n"


def test_stage_entry_keeps_programming_errors_as_tracebacks():
    @stage_entry
    def main():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        main()


A_STAGE = """
import signal, sys, time
from pipelines.errors import stage_entry
# Ctrl-C's KeyboardInterrupt, as in a terminal: a background job of a non-interactive shell (CI's, maybe)
# starts its children with SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
@stage_entry
def main():
    print("ready", flush=True)
    time.sleep(60)
main()
"""


@pytest.mark.parametrize(("sent", "code", "says"), [(signal.SIGTERM, 143, "terminated (SIGTERM)\n"),
                                                    (signal.SIGINT, 130, "interrupted\n")])
def test_a_stopped_stage_says_so_in_one_line(sent, code, says):
    """SIGTERM (`kill`, `timeout`, a cancelled job) ends a stage as Ctrl-C does, through its clean-up, not at once."""
    stage = subprocess.Popen([sys.executable, "-c", A_STAGE], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert stage.stdout.readline() == "ready\n"
    stage.send_signal(sent)
    out, err = stage.communicate(timeout=30)
    assert stage.returncode == code and err == says, err


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "a.txt").write_text("half-written")
        raise RuntimeError("crash mid-way")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_write_json_is_sorted_and_complete(tmp_path):
    path = tmp_path / "deep" / "x.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert len(sha256_file(path)) == 64


def test_telemetry_is_off_in_this_process():
    for key in TELEMETRY_OFF:
        assert key in os.environ
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


# ---------------------------------------------------------------- device resolution (facts given, no GPU needed)

from pipelines.runtime import (DeviceChoice, Hardware, device_line, device_record, probe, resolve,  # noqa: E402
                               trial_resources)

CPU = Hardware(cores=16, threads=16)
ZEN4 = Hardware(cores=2, threads=2, cpu_bf16=True)  # AVX512-BF16
H200 = Hardware(16, 16, gpus=1, gpu_name="NVIDIA H200", gpu_memory_gib=139.8, capability=(9, 0), bf16=True,
                cuda_version="13.0", driver_version="580.65")
T4 = Hardware(8, 8, gpus=4, gpu_name="Tesla T4", gpu_memory_gib=15.6, capability=(7, 5), bf16=False)
P100 = Hardware(8, 8, gpus=1, gpu_name="Tesla P100", gpu_memory_gib=16.0, capability=(6, 0), bf16=False)


def test_auto_on_each_kind_of_hardware():
    assert resolve("auto", "auto", True, True, CPU) == DeviceChoice("cpu", "off", False, True, "kernels")
    assert resolve("auto", "auto", True, True, H200) == DeviceChoice("cuda", "bf16", False, True, "cudnn")
    # fp16 with a GradScaler where the GPU has no bf16; no channels_last without tensor cores
    assert resolve("auto", "auto", True, True, T4) == DeviceChoice("cuda", "fp16", True, True, "cudnn")
    assert resolve("auto", "auto", True, False, P100) == DeviceChoice("cuda", "fp16", True, False, "off")
    assert resolve("cpu", "auto", False, True, H200) == DeviceChoice("cpu", "off", False, False, "kernels")
    assert resolve("auto", "bf16", True, True, CPU).amp == "bf16"  # CPU autocast takes bf16
    # float32 on the CPU even with bf16 instructions: bf16 halves depthwise convolutions' speed (bench/cpu_amp.py)
    assert resolve("auto", "auto", True, True, ZEN4) == DeviceChoice("cpu", "off", False, True, "kernels")
    assert resolve("auto", "bf16", True, True, ZEN4).amp == "bf16"
    assert device_line(resolve("auto", "bf16", True, True, ZEN4), ZEN4).endswith("amp bf16, channels_last, "
                                                                                "deterministic kernels")
    assert "amp bf16 (emulated: this CPU has no bf16 instructions), " in device_line(
        resolve("auto", "bf16", True, True, CPU), CPU)


@pytest.mark.parametrize("cpuinfo, native", [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n", True),  # AMD Zen 4
    ("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n", True),  # Intel Sapphire Rapids
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm Neoverse V1
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n", False),  # Cascade Lake: emulated
    ("", False),
])
def test_native_cpu_bf16_comes_from_the_cpu_flags(tmp_path, cpuinfo, native):
    from pipelines.runtime import _cpu_has_bf16

    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert _cpu_has_bf16(path) is native
    assert _cpu_has_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize("device, amp, hardware, message", [
    ("cuda", "auto", CPU, "train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')"),
    ("cpu", "fp16", H200, "train.amp fp16 needs CUDA; use bf16 or off on the CPU"),
    ("auto", "bf16", T4, "train.amp bf16: Tesla T4 (compute capability 7.5) has no native bf16; use auto or fp16"),
])
def test_what_the_hardware_cannot_do_is_one_line(device, amp, hardware, message):
    with pytest.raises(ConvForgeError) as error:
        resolve(device, amp, True, True, hardware)
    assert str(error.value) == message


def test_the_device_line_and_record_name_the_hardware():
    line = device_line(resolve("auto", "auto", True, True, H200), H200)
    assert line == ("device: cuda x1 NVIDIA H200 (139.8 GiB, capability 9.0, CUDA 13.0, driver 580.65); "
                    "amp bf16, channels_last, deterministic cudnn")
    assert device_line(resolve("auto", "auto", True, True, T4), T4).endswith("amp fp16 + loss scaling, "
                                                                            "channels_last, deterministic cudnn")
    record = device_record(resolve("auto", "auto", False, False, CPU), CPU)
    assert record == {"device": "cpu", "amp": "off", "grad_scaler": False, "channels_last": False,
                      "deterministic": "off", "cores": 16, "threads": 16}
    assert device_record(resolve("auto", "auto", True, True, H200), H200)["gpu_name"] == "NVIDIA H200"


@pytest.mark.parametrize("cpus, gpus, concurrent, hardware, expected", [
    ("auto", "auto", 16, Hardware(64, 64, gpus=4), (4.0, 0.25)),
    ("auto", "auto", 3, Hardware(8, 8, gpus=1), (2.0, 0.3333)),  # three shares fit one GPU
    ("auto", "auto", 2, Hardware(8, 8, gpus=8), (4.0, 1.0)),  # at most one GPU a trial
    ("auto", "auto", 4, Hardware(2, 2), (1.0, 0.0)),  # at least one core; no GPU: none asked (trials on the CPU)
    (3, 0.5, 4, Hardware(2, 2), (3.0, 0.5)),  # numbers as given
])
def test_trial_resources(cpus, gpus, concurrent, hardware, expected):
    assert trial_resources(cpus, gpus, concurrent, hardware) == expected


def test_this_machine_without_a_gpu_resolves_auto_to_the_cpu():
    hardware = probe()
    if hardware.gpus:
        pytest.skip("this machine has a GPU")
    assert hardware.cores == len(os.sched_getaffinity(0))
    assert resolve("auto", "auto", True, True, hardware).device == "cpu"
    assert trial_resources("auto", "auto", 2, hardware) == (max(1.0, float(hardware.cores // 2)), 0.0)
