"""Resume of `stepq quantize --scheme gguf`: an interrupted export keeps each tensor it finished (every type is
written in one pass into planned files, `convert.gguf_quantize`) and gives the very bytes of an uninterrupted run; a changed input or setting redoes what depends on it; `--force` starts over.

The fault-injection test SIGKILLs real `stepq quantize` processes at random points with bench/fault_soak.py's
harness (a watcher checks the final folder never appears unfinished). The other tests stop a run in-process after a
chosen number of finished units, so they know exactly what the earlier run left behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert.ledger import LEDGER_NAME
from convert.writer import ArtifactWriter
from stepq.cli import main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "bench" / "fault_soak.py")
soak = sys.modules.setdefault("fault_soak", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(soak)

KILLS = 6
NAME = "tiny-step35-GGUF-Q4_K_M"
TENSORS = 113  # in the bundled model's Q4_K_M GGUF (checked against the reference): the K/IQ export's units


def _gguf(model: Path, out: Path, *extra: str, qtype: str = "Q4_K_M") -> list[str]:
    return ["quantize", str(model), "--scheme", "gguf", "--qtype", qtype, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(llama_cpp, bundled_fixture, tmp_path_factory) -> dict[str, str]:
    """An uninterrupted Q4_K_M export of the bundled model: sha256 per file (stepq.json without run fields)."""
    out = tmp_path_factory.mktemp("ref")
    assert main(_gguf(bundled_fixture, out)) == 0
    assert len(gguf.GGUFReader(out / NAME / f"{bundled_fixture.name}-Q4_K_M.gguf").tensors) == TENSORS
    return soak.artifact_digest(out / NAME)


@pytest.mark.soak
def test_sigkill_at_random_points_then_resume_is_byte_identical(reference, bundled_fixture, tmp_path):
    t0 = time.time()
    cmd = [*soak.STEPQ, *_gguf(bundled_fixture, tmp_path / "timed")]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    full_s = time.time() - t0
    rng, figures, r = random.Random(20261127), soak.Figures(), 0
    while figures.kills < KILLS:
        out = tmp_path / f"round{r}"
        out.mkdir()
        cmd = [*soak.STEPQ, *_gguf(bundled_fixture, out)]
        # one unit per tensor; kills aimed after a record, or at a random time in a whole run
        soak.kill_resume_round(cmd, out, out / NAME, reference, rng, TENSORS, min(3, KILLS - figures.kills),
                               figures, startup_s=full_s)
        r += 1
    print(figures)  # pytest -s shows the figures: kills, runs, stages reused, kill points
    assert figures.kills >= KILLS and figures.identical_rounds == figures.rounds  # no data lost
    assert figures.partial_sightings == 0 and figures.stray_files == []
    assert figures.resumed_runs >= 1 and figures.units_reused > 0  # resuming was exercised, not just restarting


def test_a_killed_run_takes_its_llama_cpp_tool_with_it(tmp_path):
    """A tool left running by a killed stepq would keep writing into the folder the next run resumes in."""
    bin_dir = tmp_path / "src" / "build" / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / ".stepq-built").write_text("fake build\n")
    (bin_dir / "llama-quantize").write_text("#!/bin/sh\nexec sleep 60\n")
    (bin_dir / "llama-quantize").chmod(0o755)
    env = {**os.environ, "LLAMA_CPP_DIR": str(tmp_path)}
    stepq = subprocess.Popen([sys.executable, "-c", "from convert.gguf_tools import run; run('llama-quantize', [])"],
                             cwd=ROOT, env=env)
    children = Path(f"/proc/{stepq.pid}/task/{stepq.pid}/children")
    deadline = time.time() + 30
    while not children.read_text().split() and time.time() < deadline:
        time.sleep(0.05)
    (tool_pid,) = map(int, children.read_text().split())
    stepq.send_signal(signal.SIGKILL)
    stepq.wait()
    deadline = time.time() + 10
    while _alive(tool_pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(tool_pid)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


# -- an earlier run that stopped after a known number of stages ----------------------------------------------------

class Crash(Exception):
    """Stands for the process dying: not bad input, so the temporary folder keeps its finished stages."""


def _crash_after(monkeypatch, k: int) -> None:
    """Raise Crash once `k` tensors are recorded as finished."""
    real, done = ArtifactWriter.commit, []

    def commit(self, *args):
        real(self, *args)
        done.append(args[0])
        if len(done) == k:
            raise Crash(f"after {done}")
    monkeypatch.setattr(ArtifactWriter, "commit", commit)


def _interrupted(argv: list[str], out: Path, monkeypatch, k: int, name: str = NAME) -> Path:
    _crash_after(monkeypatch, k)
    with pytest.raises(Crash):
        main(argv)
    monkeypatch.undo()
    partial = out / f".{name}.partial"
    assert not (out / name).exists() and (partial / LEDGER_NAME).is_file()
    assert not (out / f".{name}.lock").exists()  # released on the way out
    return partial


def _resumed(caplog) -> str | None:
    """What the last run said it reused: 'N of M units reused from the interrupted run (stages)'."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed: ")]
    return lines[-1].removeprefix("resumed: ") if lines else None


@pytest.mark.parametrize("k", [1, 40, TENSORS - 1])
def test_resume_keeps_the_finished_tensors(reference, bundled_fixture, tmp_path, monkeypatch, caplog, k):
    out = tmp_path / "out"
    _interrupted(_gguf(bundled_fixture, out), out, monkeypatch, k)
    caplog.set_level(logging.INFO)
    assert main(_gguf(bundled_fixture, out)) == 0
    assert _resumed(caplog) == f"{k} of {TENSORS} units reused from the interrupted run (tensors)"
    assert soak.artifact_digest(out / NAME) == reference
    assert sorted(p.name for p in out.iterdir() if p.name != ".last-artifact") == [NAME]


def test_resume_of_a_direct_type(bundled_fixture, tmp_path, monkeypatch, caplog):
    """Q8_0 (gguf-py's bytes) goes through the same writer, split here in 3 files: killed after 50 tensors."""
    name, split = "tiny-step35-GGUF-Q8_0", ("--max-shard-size", "5MB")
    assert main(_gguf(bundled_fixture, tmp_path / "ref", *split, qtype="Q8_0")) == 0
    reference = soak.artifact_digest(tmp_path / "ref" / name)
    assert len(reference) == 4  # 3 files + stepq.json
    out = tmp_path / "out"
    _interrupted(_gguf(bundled_fixture, out, *split, qtype="Q8_0"), out, monkeypatch, 50, name)
    caplog.set_level(logging.INFO)
    assert main(_gguf(bundled_fixture, out, *split, qtype="Q8_0")) == 0
    assert _resumed(caplog) == f"50 of {TENSORS} units reused from the interrupted run (tensors)"
    assert soak.artifact_digest(out / name) == reference


def test_another_setting_redoes_what_depends_on_it(bundled_fixture, tmp_path, monkeypatch, caplog):
    """--no-mtp writes into the same folder: another file layout, so the file is written again from the start."""
    assert main(_gguf(bundled_fixture, tmp_path / "ref", "--no-mtp")) == 0
    reference = soak.artifact_digest(tmp_path / "ref" / NAME)
    out = tmp_path / "out"
    _interrupted(_gguf(bundled_fixture, out), out, monkeypatch, 40)
    caplog.set_level(logging.INFO)
    assert main(_gguf(bundled_fixture, out, "--no-mtp")) == 0
    assert "earlier partial output is for another plan" in caplog.text
    assert _resumed(caplog) is None and soak.artifact_digest(out / NAME) == reference


def test_a_touched_source_shard_redoes_everything(reference, bundled_fixture, tmp_path, monkeypatch, caplog):
    """A shard is identified by size, mtime and header hash (reading 400 GB to compare would defeat the resume)."""
    model = Path(shutil.copytree(bundled_fixture, tmp_path / "tiny-step35"))
    out = tmp_path / "out"
    _interrupted(_gguf(model, out), out, monkeypatch, 40)
    shard = model / "model.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    caplog.set_level(logging.INFO)
    assert main(_gguf(model, out)) == 0
    # every tensor read from the shard is converted again; only rope_freqs (made from config.json) is kept
    assert "inputs or settings changed since the earlier run" in caplog.text
    assert _resumed(caplog) == f"1 of {TENSORS} units reused from the interrupted run (tensors)"
    file = f"{bundled_fixture.name}-Q4_K_M.gguf"  # same bytes; the provenance names another folder
    assert soak.artifact_digest(out / NAME)[file] == reference[file]


def test_other_statistics_redo_only_the_tensors_they_change(llama_cpp, bundled_fixture, tmp_path, monkeypatch,
                                                             caplog):
    assert main(["calibrate", str(bundled_fixture), "--out", str(tmp_path / "c"), "--num-samples", "2",
                 "--seq-len", "32"]) == 0
    stats = tmp_path / "c" / "tiny-step35-calib" / "stats.safetensors"
    other = tmp_path / "other-stats.safetensors"
    with safe_open(stats, "pt") as f:
        meta = f.metadata()
    tensors = load_file(stats)
    name = next(n for n in tensors if n.endswith(".input_sumsq"))
    tensors[name] = tensors[name] * 2  # same model, same shapes, other statistics
    save_file(tensors, other, metadata=meta)
    assert main(_gguf(bundled_fixture, tmp_path / "ref", "--imatrix", "--stats", str(other))) == 0
    reference = soak.artifact_digest(tmp_path / "ref" / NAME)
    out = tmp_path / "out"
    _interrupted(_gguf(bundled_fixture, out, "--imatrix", "--stats", str(stats)), out, monkeypatch, TENSORS - 1)
    caplog.set_level(logging.INFO)
    assert main(_gguf(bundled_fixture, out, "--imatrix", "--stats", str(other))) == 0
    changed = [r.getMessage() for r in caplog.records if "inputs or settings changed" in r.getMessage()]
    assert len(changed) == 1  # the one tensor whose imatrix weights differ
    assert _resumed(caplog) == f"{TENSORS - 2} of {TENSORS} units reused from the interrupted run (tensors)"
    assert soak.artifact_digest(out / NAME) == reference


def test_force_starts_over(reference, bundled_fixture, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    _interrupted(_gguf(bundled_fixture, out), out, monkeypatch, 40)
    caplog.set_level(logging.INFO)
    assert main(_gguf(bundled_fixture, out, "--force")) == 0
    assert "resuming" not in caplog.text and _resumed(caplog) is None
    assert soak.artifact_digest(out / NAME) == reference
