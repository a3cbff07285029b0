"""One run per output folder: a second run refuses naming the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert.errors import BadInput
from convert.lock import OutputLock, lock_path

ROOT = Path(__file__).resolve().parent.parent
# A real second process holding the lock: prints "locked", then waits to be killed.
HOLDER = ("import sys, time; from convert.lock import OutputLock; "
          "OutputLock(sys.argv[1], command='holder --for-the-test').__enter__(); print('locked', flush=True); "
          "time.sleep(600)")


def _stepq(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepq.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def _hold(target: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    return p


def _leftovers(out: Path) -> list[str]:
    """Lock files and temporary folders left in an output root."""
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".lock") or ".partial" in p.name)


def _stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def test_lock_file_names_the_holder_and_goes_away(tmp_path):
    target = tmp_path / "out" / "m-FP8"
    with OutputLock(target, command="stepq quantize m") as lock:
        record = json.loads(lock.path.read_text())
        assert lock.path == tmp_path / "out" / ".m-FP8.lock"
        assert record["pid"] == os.getpid() and record["command"] == "stepq quantize m" and record["host"]
        with pytest.raises(BadInput, match=rf"m-FP8: in use by pid {os.getpid()} on .*\(stepq quantize m\), since "
                                           r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d; lock file .*\.m-FP8\.lock"):
            OutputLock(target).__enter__()  # a second open file description conflicts, even in one process
    assert not lock_path(target).exists()
    with OutputLock(target):  # free again
        pass


def test_second_quantize_on_the_same_output_refuses_naming_the_holder(random_ckpt, tmp_path):
    """Two real `stepq quantize` processes: the first is paused (SIGSTOP) while it holds the lock."""
    out = tmp_path / "out"
    final = out / "rand-step35-FP8-BLOCK-ALL"
    first = subprocess.Popen([sys.executable, "-m", "stepq.cli", "quantize", str(random_ckpt), "--scheme",
                              "fp8-block-all", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (lock_path(final).exists() and lock_path(final).read_text().strip()):
            assert first.poll() is None and time.time() < deadline, "first run never took the lock"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)
        second = _stepq("quantize", random_ckpt, "--scheme", "fp8-block-all", "--out", out)
        assert second.returncode == 2 and second.stdout == ""
        (line,) = second.stderr.strip().splitlines()
        assert re.search(rf"stepq: error: {re.escape(str(final))}: in use by pid {first.pid} on \S+ "
                         rf"\(\S*(cli.py|stepq) quantize {re.escape(str(random_ckpt))} --scheme fp8-block-all.*\), since ",
                         line), line
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert (final / "stepq.json").is_file()  # the first run was not disturbed
    assert _leftovers(out) == []


def test_calibrate_refuses_while_another_process_holds_its_output(tmp_path, bundled_fixture):
    out = tmp_path / "out"
    holder = _hold(out / f"{bundled_fixture.name}-calib")
    try:
        p = _stepq("calibrate", bundled_fixture, "--out", out, "--num-samples", "2", "--seq-len", "16")
    finally:
        _stop(holder)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert f"tiny-step35-calib: in use by pid {holder.pid} on " in line and "(holder --for-the-test)" in line
    assert not (out / f"{bundled_fixture.name}-calib").exists()


def test_a_dead_holders_lock_is_taken_over(random_ckpt, tmp_path):
    out = tmp_path / "out"
    final = out / "rand-step35-FP8-BLOCK"
    holder = _hold(final)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the lock file stays, the flock goes with the process
    holder.wait()
    assert str(holder.pid) in lock_path(final).read_text()
    p = _stepq("quantize", random_ckpt, "--scheme", "fp8-block", "--out", out)
    assert p.returncode == 0, p.stderr
    assert re.search(rf"taking over the lock of pid {holder.pid} on \S+ \(holder --for-the-test\), since .*: that "
                     r"process is gone", p.stderr), p.stderr
    assert final.is_dir() and _leftovers(out) == []
