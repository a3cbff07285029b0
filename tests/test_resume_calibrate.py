"""Resume of `stepq calibrate`: a run stopped after some layers continues after the last one it finished and writes
the statistics of an uninterrupted run; other inputs or settings and `--force` start over; a damaged or torn
checkpoint is redone from the last intact one.

The in-process tests stop a run by raising from `LayerCheckpoints` after a chosen number of layers, so they know
exactly what it left behind. The fault-injection test SIGKILLs real `stepq calibrate` processes at random points
(bench/fault_soak.py, which runs the same rounds longer with --calibrate-kills). Statistics are compared with
`fault_soak.stats_digest`: every tensor's bytes and all the metadata but the run's own timings and peak memory.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import re
import sys
from pathlib import Path

import pytest

import calib.resume as resume
from convert.fixtures import BUNDLED_FIXTURE, fixture_config
from convert.ledger import LEDGER_NAME
from stepq.calibrate import calibrate
from stepq.cli import main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "bench" / "fault_soak.py")
soak = sys.modules.setdefault("fault_soak", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(soak)

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical results need the same threads in every run
N, L = 4, 64
LAYERS = fixture_config()["num_hidden_layers"] + fixture_config()["num_nextn_predict_layers"]  # 5 trunk + 2 MTP
KILLS = 6
CALIB = f"{BUNDLED_FIXTURE.name}-calib"


class Crash(Exception):
    """Stands for the process dying: not bad input, so the finished layers are kept."""


def _calibrate(out: Path, **settings) -> Path:
    return calibrate(BUNDLED_FIXTURE, out_root=out, progress=False, **{"n": N, "seq_len": L, **settings})


def _crash_after(monkeypatch, k: int) -> None:
    real, done = resume.LayerCheckpoints.commit, []

    def commit(self, layer, output):
        real(self, layer, output)
        done.append(layer)
        if len(done) == k:
            raise Crash(f"after layer {layer}")
    monkeypatch.setattr(resume.LayerCheckpoints, "commit", commit)


def _interrupted(out: Path, monkeypatch, k: int, **settings) -> Path:
    """A run stopped after finishing `k` more layers; -> its checkpoint folder."""
    _crash_after(monkeypatch, k)
    with pytest.raises(Crash):
        _calibrate(out, **settings)
    monkeypatch.undo()
    partial = out / CALIB / ".stats.safetensors.partial"
    assert not (out / CALIB / "stats.safetensors").exists() and (partial / LEDGER_NAME).is_file()
    assert not (out / f".{CALIB}.lock").exists()  # released on the way out
    return partial


def _reused(caplog) -> list[int]:
    return [int(k) for k in re.findall(r"resumed: (\d+) layers reused", caplog.text)]


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """digest(**settings): the statistics of an uninterrupted run with those settings."""
    digests = {}

    def digest(**settings) -> str:
        key = tuple(sorted(settings.items()))
        if key not in digests:
            digests[key] = soak.stats_digest(_calibrate(tmp_path_factory.mktemp("ref"), **settings))
        return digests[key]
    return digest


@pytest.mark.parametrize("spill_bytes", [None, 0], ids=["in-ram", "spilled"])
def test_interrupted_runs_resume_to_identical_statistics(tmp_path, monkeypatch, caplog, reference, spill_bytes):
    """Stopped after 2 layers, then 3 more (the whole trunk; the lm_head inputs not yet recorded), then the first
    MTP layer (whose checkpoint carries them), then the last one (before the file was written)."""
    settings = {} if spill_bytes is None else {"spill_bytes": spill_bytes}
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    for k in (2, 3, 1, 1):
        _interrupted(out, monkeypatch, k, **settings)
    stats = _calibrate(out, **settings)
    assert _reused(caplog) == [2, 5, 6, LAYERS]
    assert soak.stats_digest(stats) == reference(**settings)
    assert sorted(p.name for p in out.rglob("*")) == ["stats.safetensors", CALIB]  # checkpoints and lock gone


def test_spilled_activations_are_the_checkpoint_files(tmp_path, monkeypatch):
    """With activations on disk, a layer writes its output through a memory map straight into the checkpoint folder;
    the checkpoint is that file renamed, and a resumed run maps it again instead of reading it into memory."""
    real_commit, real_resume, resumed = resume.LayerCheckpoints.commit, resume.LayerCheckpoints.resume, []

    def commit(self, layer, output):
        spill = self.spill_file(layer)
        assert output.on_disk and output.file == spill
        inode = spill.stat().st_ino
        real_commit(self, layer, output)
        assert (self.dir / f"act-{layer:03d}.bin").stat().st_ino == inode and output.file.stat().st_ino == inode
        if layer == 2:
            raise Crash

    def resume_(self, spill_bytes):
        point = real_resume(self, spill_bytes)
        resumed.append(point and (point[0], point[1].on_disk))
        return point
    monkeypatch.setattr(resume.LayerCheckpoints, "commit", commit)
    monkeypatch.setattr(resume.LayerCheckpoints, "resume", resume_)
    with pytest.raises(Crash):
        _calibrate(tmp_path, spill_bytes=0)
    _calibrate(tmp_path, spill_bytes=0)
    assert resumed == [None, (2, True)]


@pytest.mark.parametrize("change", [{"seed": 1}, {"n": 3}], ids=["seed", "n"])
def test_other_settings_start_over(tmp_path, monkeypatch, caplog, reference, change):
    out = tmp_path / "out"
    _interrupted(out, monkeypatch, 3)
    caplog.set_level(logging.INFO)
    stats = _calibrate(out, **change)
    assert "the interrupted run was for other inputs or settings; starting over" in caplog.text
    assert _reused(caplog) == [] and soak.stats_digest(stats) == reference(**change)


def test_other_dataset_contents_start_over(tmp_path, monkeypatch, caplog, reference):
    data = tmp_path / "data.txt"
    data.write_text((BUNDLED_FIXTURE.parent / "tiny-step35-data" / "calib.txt").read_text()[:40_000])
    out = tmp_path / "out"
    _interrupted(out, monkeypatch, 3, dataset=str(data))
    data.write_text(data.read_text() + "\nmore text\n")
    caplog.set_level(logging.INFO)
    stats = _calibrate(out, dataset=str(data))
    assert "the interrupted run was for other inputs or settings; starting over" in caplog.text
    assert _reused(caplog) == [] and soak.stats_digest(stats) == reference(dataset=str(data))


def test_force_starts_over(tmp_path, monkeypatch, caplog, reference):
    out = tmp_path / "out"
    _interrupted(out, monkeypatch, 3)
    caplog.set_level(logging.INFO)
    assert main(["calibrate", str(BUNDLED_FIXTURE), "--out", str(out), "--num-samples", str(N), "--seq-len", str(L),
                 "--force"]) == 0
    assert "starting over (--force)" in caplog.text and _reused(caplog) == []
    assert soak.stats_digest(out / CALIB / "stats.safetensors") == reference()


@pytest.mark.parametrize("victim", ["stats-001.safetensors", "act-003.bin"])
def test_a_damaged_checkpoint_is_redone(tmp_path, monkeypatch, caplog, reference, victim):
    """Only the last finished layer's output is kept (disk use stays at two layers' activations): with layer 1's
    statistics or layer 3's output damaged, no intact layer is left to continue from, so the run starts over."""
    partial = _interrupted(tmp_path, monkeypatch, 4)
    _damage(partial / victim)
    caplog.set_level(logging.INFO)
    stats = _calibrate(tmp_path)
    assert f"{partial / victim}: damaged" in caplog.text and "0 of 4 finished layers intact" in caplog.text
    assert _reused(caplog) == [] and soak.stats_digest(stats) == reference()


def test_a_damaged_last_layer_is_redone_from_the_one_before(tmp_path, monkeypatch, caplog, reference):
    """A run killed after recording layer 3 but before dropping layer 2's output leaves both: with layer 3's output
    damaged, the re-run continues after layer 2."""
    real, seen = resume.LayerCheckpoints._drop_outputs_before, []

    def drop(self, act):
        seen.append(act)
        if len(seen) == 4:
            raise Crash
        real(self, act)
    monkeypatch.setattr(resume.LayerCheckpoints, "_drop_outputs_before", drop)
    with pytest.raises(Crash):
        _calibrate(tmp_path)
    monkeypatch.undo()
    partial = tmp_path / CALIB / ".stats.safetensors.partial"
    assert sorted(p.name for p in partial.glob("act-*")) == ["act-002.bin", "act-003.bin"]
    _damage(partial / "act-003.bin")
    caplog.set_level(logging.INFO)
    stats = _calibrate(tmp_path)
    assert f"{partial / 'act-003.bin'}: damaged" in caplog.text and _reused(caplog) == [3]
    assert soak.stats_digest(stats) == reference()


def test_a_torn_progress_line_is_dropped(tmp_path, monkeypatch, caplog, reference):
    partial = _interrupted(tmp_path, monkeypatch, 4)
    with open(partial / LEDGER_NAME, "a") as f:
        f.write('{"unit":"stats-004","key":"0a1b2c')  # the kill came mid-line
    caplog.set_level(logging.INFO)
    stats = _calibrate(tmp_path)
    assert _reused(caplog) == [4] and soak.stats_digest(stats) == reference()


def test_a_failed_write_keeps_finished_layers_and_says_so(tmp_path, monkeypatch, capsys):
    """One line naming the files; the finished layers stay for the same command to resume."""
    real, done = resume.LayerCheckpoints.commit, []

    def commit(self, layer, output):
        if len(done) == 2:
            raise OSError(28, "No space left on device", str(self.dir / f"stats-{layer:03d}.safetensors.tmp"))
        real(self, layer, output)
        done.append(layer)
    monkeypatch.setattr(resume.LayerCheckpoints, "commit", commit)
    args = ["calibrate", str(BUNDLED_FIXTURE), "--out", str(tmp_path), "--num-samples", str(N), "--seq-len", str(L)]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    partial = tmp_path / CALIB / ".stats.safetensors.partial"
    assert line == (f"stepq: error: {tmp_path / CALIB / 'stats.safetensors'}: cannot write the statistics file (No "
                    f"space left on device: {partial / 'stats-002.safetensors.tmp'}); finished layers kept in "
                    f"{partial}: re-run the same command to resume, --force to start over")
    assert sorted(p.name for p in partial.iterdir()) == [LEDGER_NAME, "act-001.bin", "stats-000.safetensors",
                                                         "stats-001.safetensors"]


@pytest.mark.soak
def test_sigkill_at_random_points_then_resume_is_identical(tmp_path, bundled_fixture):
    figures = soak.Figures()
    soak.calibrate_soak(bundled_fixture, KILLS, random.Random(20261124), tmp_path, figures,
                        args=("--num-samples", str(N), "--seq-len", str(L)))
    print(figures)  # pytest -s shows the figures: kills, runs, layers reused, kill points
    assert figures.calibrate_kills >= KILLS and figures.calibrate_identical == figures.calibrate_rounds >= 1
    assert figures.partial_sightings == 0 and figures.stray_files == []  # never visible unfinished, nothing stray
    assert figures.calibrate_resumed_runs >= 2 and figures.calibrate_layers_reused > 0  # resumed, not restarted
