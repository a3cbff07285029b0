"""`--executor ray` on a local cluster the tests start (conftest `ray_cluster`: a head and two 1-CPU worker nodes):
conversions byte-identical to the local executor's, calibration statistics equal to a local run's, worker
processes killed mid-task (Ray retries), drivers killed and resumed, and bad input in one line with nothing written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stepq.cli import main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "bench" / "fault_soak.py")
soak = sys.modules.setdefault("fault_soak", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(soak)


# Calibration settings: three micro-batches (the minimum is 4096 tokens), so two shards, at a third of the default
CALIBRATION = ["--num-samples", "80", "--seq-len", "128"]


def _ray(cluster) -> list[str]:
    return ["--executor", "ray", "--ray-address", cluster.address]


def _stats(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["stepq_calibration"])  # noqa: SIM118


@pytest.fixture(scope="module")
def local_stats(bundled_fixture, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local-calib")
    assert main(["calibrate", str(bundled_fixture), "--out", str(out), *CALIBRATION]) == 0
    return out / f"{bundled_fixture.name}-calib" / "stats.safetensors"


def _assert_same_statistics(ours: Path, reference: Path) -> None:
    """Maxima, counts and loads bit for bit; sums of squares within one float32 ulp (calib.distributed: merged per
    shard), and counted, so a change in how often they differ shows."""
    got, meta = _stats(ours)
    want, _ = _stats(reference)
    assert sorted(got) == sorted(want)
    apart = 0
    for name, w in want.items():
        g = got[name]
        if name.endswith(".input_sumsq"):
            ulp = torch.finfo(torch.float32).eps * w.abs().clamp_min(torch.finfo(torch.float32).tiny)
            assert ((g - w).abs() <= ulp).all(), name
            apart += int((g != w).sum())
        else:
            assert torch.equal(g, w), name
    assert apart == 0  # the fixture: none apart at all (the bound above is what holds in general)
    assert meta["executor"]["executor"] == "ray" and meta["executor"]["shards"] == 2  # really split in two


def _variant(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.endswith("-calib")]
    return folder


@pytest.mark.parametrize("scheme", ["nvfp4a16", "fp8-static", "gguf"])
def test_conversion_on_ray_is_byte_identical(ray_cluster, bundled_fixture, local_stats, tmp_path, scheme, request):
    """Every file the same bytes; stepq.json the same but for the run's timings, memory and executor."""
    if scheme == "gguf":
        request.getfixturevalue("llama_cpp")  # Q4_K_M with an imatrix quantizes through ggml
    extra = {"nvfp4a16": [], "fp8-static": ["--stats", str(local_stats)],
             "gguf": ["--qtype", "Q4_K_M", "--imatrix", "--stats", str(local_stats)]}[scheme]
    cmd = ["quantize", str(bundled_fixture), "--scheme", scheme, *extra]
    assert main([*cmd, "--out", str(tmp_path / "local")]) == 0
    assert main([*cmd, "--out", str(tmp_path / "ray"), *_ray(ray_cluster)]) == 0
    local, ray = _variant(tmp_path / "local"), _variant(tmp_path / "ray")
    assert soak.artifact_digest(ray) == soak.artifact_digest(local)
    assert json.loads((ray / "stepq.json").read_text())["executor"] == {
        "executor": "ray", "nodes": 2, "cpus": 2, "cpus_per_task": 1}


class TaskKiller(threading.Thread):
    """SIGKILLs Ray worker processes while they run `function` (a worker's process title is `ray::<function>` while
    it executes one), up to `kills` times, `gap_s` apart so that Ray's retries of one task do not all die."""

    def __init__(self, function: str, kills: int, gap_s: float = 0.5):
        super().__init__(daemon=True)
        self.title, self.kills, self.gap_s = f"ray::{function}".encode(), kills, gap_s
        self.killed: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set() and len(self.killed) < self.kills:
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if not f.read().startswith(self.title):
                            continue
                    os.kill(pid, signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
                self.killed.append(pid)
                self.stopped.wait(self.gap_s)
                break

    def __enter__(self) -> TaskKiller:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.join()


def test_calibration_on_ray_equals_local_with_workers_killed_mid_shard(ray_cluster, bundled_fixture, local_stats,
                                                                        tmp_path):
    with TaskKiller("run_shard", kills=2) as killer:
        assert main(["calibrate", str(bundled_fixture), "--out", str(tmp_path), *CALIBRATION,
                     *_ray(ray_cluster)]) == 0
    assert len(killer.killed) == 2
    _assert_same_statistics(tmp_path / local_stats.parent.name / local_stats.name, local_stats)


def test_worker_killed_mid_task_conversion_completes_byte_identical(ray_cluster, bundled_fixture, tmp_path):
    cmd = ["quantize", str(bundled_fixture), "--scheme", "nvfp4a16"]
    assert main([*cmd, "--out", str(tmp_path / "local")]) == 0
    # a conversion task takes milliseconds: poll without pause, and run again until a kill has landed mid-task
    with TaskKiller("_run_task", kills=2, gap_s=0.2) as killer:
        for _ in range(5):
            assert main([*cmd, "--out", str(tmp_path / "ray"), "--force", *_ray(ray_cluster)]) == 0
            if killer.killed:
                break
    assert killer.killed, "no worker was caught running a task"
    assert soak.artifact_digest(_variant(tmp_path / "ray")) == soak.artifact_digest(_variant(tmp_path / "local"))


def _kill_then_resume(cmd: list[str], ledger: Path, prefix: str, after: int, log: Path) -> str:
    """Run `cmd`, SIGKILL it once `after` units starting with `prefix` are in its ledger, run it again to the end
    -> the second run's stderr."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and soak._units_done(ledger, "unit", prefix) < after:
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    with open(log, "w") as err:
        assert subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err).returncode == 0, log.read_text()
    return log.read_text()


def test_killed_driver_resumes_the_conversion(ray_cluster, bundled_fixture, tmp_path):
    args = ["quantize", str(bundled_fixture), "--scheme", "fp8-block-all", "--max-shard-size", "4MB"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    final = tmp_path / "run" / _variant(tmp_path / "ref").name
    ledger = final.parent / f".{final.name}.partial" / soak.LEDGER_NAME
    text = _kill_then_resume([*soak.STEPQ, *args, "--out", str(final.parent), *_ray(ray_cluster)], ledger, "", 5,
                             tmp_path / "resume.err")
    assert int(re.search(r"resumed: (\d+) of \d+ units reused", text).group(1)) >= 5
    assert soak.artifact_digest(final) == soak.artifact_digest(_variant(tmp_path / "ref"))


def test_killed_driver_resumes_the_calibration(ray_cluster, bundled_fixture, local_stats, tmp_path):
    stats = tmp_path / local_stats.parent.name / local_stats.name
    ledger = stats.parent / f".{stats.name}.partial" / soak.LEDGER_NAME
    cmd = [*soak.STEPQ, "calibrate", str(bundled_fixture), "--out", str(tmp_path), *CALIBRATION, *_ray(ray_cluster)]
    # killed once layer 2's statistics are recorded: its output may not be yet, so layers 0-1 at least are reused
    text = _kill_then_resume(cmd, ledger, "stats-", 3, tmp_path / "resume.err")
    assert int(re.search(r"resumed: (\d+) layers reused", text).group(1)) >= 2
    assert soak.stats_digest(stats) == soak.stats_digest(local_stats)


# -- bad input: one line, exit 2, nothing written -----------------------------------------------------------------

def _refused(capsys, argv: list[str], out: Path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("stepq: error: ")
    assert not out.exists()
    return err.splitlines()[-1]


def test_ray_not_installed(bundled_fixture, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    err = _refused(capsys, ["quantize", str(bundled_fixture), "--scheme", "nvfp4a16", "--out", str(tmp_path / "o"),
                            "--executor", "ray"], tmp_path / "o")
    assert "Ray is not installed" in err and ".[ray]" in err


def test_unreachable_address(bundled_fixture, tmp_path, capsys):
    t0 = time.time()
    err = _refused(capsys, ["calibrate", str(bundled_fixture), "--out", str(tmp_path / "o"), "--executor", "ray",
                            "--ray-address", "127.0.0.1:9"], tmp_path / "o")
    assert "--ray-address 127.0.0.1:9: no Ray cluster answers there" in err
    assert time.time() - t0 < 30  # not Ray's minute of retries


def test_ray_address_without_the_ray_executor(bundled_fixture, tmp_path, capsys):
    err = _refused(capsys, ["quantize", str(bundled_fixture), "--scheme", "nvfp4a16", "--out", str(tmp_path / "o"),
                            "--ray-address", "127.0.0.1:6379"], tmp_path / "o")
    assert "--ray-address: applies to --executor ray" in err


def test_workers_that_cannot_see_the_source(ray_cluster, bundled_fixture, tmp_path):
    """The driver runs in its own mount namespace, where the source is bind-mounted onto an empty folder: the
    workers, outside it, see the folder empty (a node without the files)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.fail("this test needs `unshare -rm` (util-linux, unprivileged user namespaces)")
    seen = tmp_path / "model"
    seen.mkdir()
    out = tmp_path / "out"
    stepq = " ".join([*soak.STEPQ, "quantize", str(seen), "--scheme", "nvfp4a16", "--out", str(out),
                      *_ray(ray_cluster)])
    script = f"mount --bind {bundled_fixture.resolve()} {seen} && exec {stepq}"
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert err[-1].startswith(f"stepq: error: {seen}/config.json: not readable on ") and "Ray node" in err[-1]
    assert not out.exists()


def test_step37_image_calibration_on_ray_equals_local(ray_cluster, tmp_path):
    """Image features are scattered into the embeddings on the driver; the shards then see the rows as a local run
    does. Micro-batches of two sequences, so the 8 image samples make 4 of them and 2 shards."""
    from convert.fixtures import STEP37_FIXTURE
    from convert.ray_executor import connect
    from stepq.calibrate import calibrate

    data = STEP37_FIXTURE.parent / "tiny-step37-data" / "calib.jsonl"
    settings = {"dataset": str(data), "micro_batch_tokens": 2 * 256, "progress": False}  # 256 tokens per sample
    ours = calibrate(STEP37_FIXTURE, out_root=tmp_path / "ray", cluster=connect(ray_cluster.address), **settings)
    reference = calibrate(STEP37_FIXTURE, out_root=tmp_path / "local", **settings)
    _assert_same_statistics(ours, reference)
