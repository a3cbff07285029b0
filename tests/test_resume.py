"""Resume: an interrupted `stepq quantize` continues where it stopped and gives the very bytes of an uninterrupted
run; changed inputs or settings redo what depends on them; `--force` starts over; damaged partial data is redone.

The fault-injection test SIGKILLs real `stepq quantize` processes at random points (the harness is
bench/fault_soak.py, which runs the same rounds much longer). The other tests stop a run in-process with an exception
raised after a chosen number of finished units, so they know exactly what an earlier run left behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.fixtures import fixture_config, write_random_checkpoint
from convert.ledger import LEDGER_NAME
from convert.writer import ArtifactWriter
from stepq.cli import main
from stepq.quantize import quantize

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "bench" / "fault_soak.py")
soak = sys.modules.setdefault("fault_soak", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(soak)

KILLS = 20
SCHEMES = ("fp8-block-all", "nvfp4a16")  # 3-D expert stacks written row by row / one tensor set per expert


@pytest.mark.soak
def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path, bundled_fixture):
    refs = {}
    for scheme in SCHEMES:
        out = tmp_path / f"ref-{scheme}"
        assert main(["quantize", str(bundled_fixture), "--scheme", scheme, "--out", str(out), "--max-shard-size",
                     "4MB"]) == 0
        final = out / f"{bundled_fixture.name}-{scheme.upper()}"
        refs[scheme] = (soak.artifact_digest(final), final.name, soak.units_of(bundled_fixture, scheme))
    assert len(refs["fp8-block-all"][0]) > 10  # several weight shards, index, config, tokenizer, provenance
    rng, figures, r = random.Random(20261123), soak.Figures(), 0
    while figures.kills < KILLS:
        scheme = SCHEMES[r % len(SCHEMES)]
        reference, name, units = refs[scheme]
        out = tmp_path / f"round{r}"
        out.mkdir()
        cmd = [*soak.STEPQ, "quantize", str(bundled_fixture), "--scheme", scheme, "--out", str(out),
               "--max-shard-size", "4MB"]
        soak.kill_resume_round(cmd, out, out / name, reference, rng, units, min(5, KILLS - figures.kills), figures)
        r += 1
    print(figures)  # pytest -s shows the figures: kills, runs, units reused, kill points
    assert figures.kills >= KILLS and figures.identical_rounds == figures.rounds  # no data lost
    assert figures.partial_sightings == 0 and figures.stray_files == []
    assert figures.resumed_runs >= 5 and figures.units_reused > 0  # resuming was exercised, not just restarting


# -- an earlier run that stopped after a known number of units ------------------------------------------------------

class Crash(Exception):
    """Stands for the process dying: not bad input, so the writer keeps its finished work."""


def _crash_after(monkeypatch, k: int) -> None:
    real, done = ArtifactWriter.commit, []

    def commit(self, *args):
        real(self, *args)
        done.append(args[0])
        if len(done) == k:
            raise Crash(f"after {k} units")
    monkeypatch.setattr(ArtifactWriter, "commit", commit)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tpl") / "rand-step35", fixture_config(), seed=4)


@pytest.fixture
def model(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "rand-step35"))


def _quantize(model: Path, out: Path, *extra: str) -> Path:
    assert main(["quantize", str(model), "--scheme", "fp8-block", "--out", str(out), *extra]) == 0
    return out / "rand-step35-FP8-BLOCK"


def _interrupted(model: Path, out: Path, monkeypatch, k: int, *extra: str) -> Path:
    _crash_after(monkeypatch, k)
    with pytest.raises(Crash):
        main(["quantize", str(model), "--scheme", "fp8-block", "--out", str(out), *extra])
    monkeypatch.undo()
    partial = out / ".rand-step35-FP8-BLOCK.partial"
    assert not (out / "rand-step35-FP8-BLOCK").exists() and (partial / LEDGER_NAME).is_file()
    assert not (out / ".rand-step35-FP8-BLOCK.lock").exists()  # released on the way out
    return partial


def _reused(caplog) -> int | None:
    m = re.search(r"resumed: (\d+) of \d+ units reused", caplog.text)
    return int(m.group(1)) if m else None


def test_resume_reuses_finished_units(model, tmp_path, monkeypatch, caplog):
    reference = soak.artifact_digest(_quantize(model, tmp_path / "ref"))
    _interrupted(model, tmp_path / "out", monkeypatch, 30)
    caplog.set_level(logging.INFO)
    final = _quantize(model, tmp_path / "out")
    assert _reused(caplog) == 30 and soak.artifact_digest(final) == reference
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".last-artifact") == [final.name]


def _shard_units(model: Path, shard: str) -> int:
    """Units of the fp8-block recipe whose tensors all live in `shard` (units run in shard order)."""
    from convert.checkpoint import open_checkpoint
    from convert.safetensors_export import load_recipe, plan_units

    ckpt = open_checkpoint(model)
    units = plan_units(ckpt, load_recipe("fp8-block"))
    ckpt.close()
    return sum(1 for u in units if {t.shard for t in u.members} == {shard})


def test_a_changed_shard_redoes_only_its_units(model, tmp_path, monkeypatch, caplog):
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    n1 = _shard_units(model, s1)
    _interrupted(model, tmp_path / "out", monkeypatch, n1 + 10)  # all of shard 1 and 10 units of shard 2
    tensors = load_file(model / s2)
    tensors["model.layers.2.moe.down_proj.weight"][0, 0, 0] += 1  # new weights, same shapes: same plan
    save_file(tensors, model / s2, metadata={"format": "pt"})
    reference = soak.artifact_digest(_quantize(model, tmp_path / "ref"))
    caplog.set_level(logging.INFO)
    final = _quantize(model, tmp_path / "out")
    assert _reused(caplog) == n1
    assert caplog.text.count("inputs or settings changed since the earlier run") == 10
    assert soak.artifact_digest(final) == reference


class _Stats:
    """Calibration statistics stand-in: one input absmax for every module (`value`), all experts reached."""

    meta = {"fake": True}

    def __init__(self, value: float):
        self.value, self.sha256 = value, f"{int(value * 1000):064d}"

    def tokens(self, module, expert=None):
        return 10

    def input_amax(self, module, expert=None):
        return torch.tensor(self.value)


def test_other_statistics_redo_the_quantized_units_and_keep_the_rest(model, tmp_path, monkeypatch, caplog):
    from convert.checkpoint import open_checkpoint
    from convert.safetensors_export import load_recipe, plan_units

    ckpt = open_checkpoint(model)
    units = plan_units(ckpt, load_recipe("nvfp4"))
    ckpt.close()
    _crash_after(monkeypatch, len(units))  # every unit finished; stopped before the folder was published
    with pytest.raises(Crash):
        quantize(model, "nvfp4", tmp_path / "out", stats=_Stats(2.0))
    monkeypatch.undo()
    reference = soak.artifact_digest(quantize(model, "nvfp4", tmp_path / "ref", stats=_Stats(3.0)))
    caplog.set_level(logging.INFO)
    final = quantize(model, "nvfp4", tmp_path / "out", stats=_Stats(3.0))
    kept = sum(1 for u in units if not u.quantize)
    assert 0 < kept < len(units) and _reused(caplog) == kept
    assert soak.artifact_digest(final) == reference


def test_another_plan_starts_over(model, tmp_path, monkeypatch, caplog):
    _interrupted(model, tmp_path / "out", monkeypatch, 30)
    reference = soak.artifact_digest(_quantize(model, tmp_path / "ref", "--max-shard-size", "3MB"))
    caplog.set_level(logging.INFO)
    final = _quantize(model, tmp_path / "out", "--max-shard-size", "3MB")
    assert "earlier partial output is for another plan (or unusable); starting over" in caplog.text and _reused(caplog) is None
    assert soak.artifact_digest(final) == reference


def test_force_starts_over(model, tmp_path, monkeypatch, caplog):
    _interrupted(model, tmp_path / "out", monkeypatch, 30)
    reference = soak.artifact_digest(_quantize(model, tmp_path / "ref"))
    caplog.set_level(logging.INFO)
    final = _quantize(model, tmp_path / "out", "--force")
    assert "resuming" not in caplog.text and _reused(caplog) is None
    assert soak.artifact_digest(final) == reference


def test_damaged_partial_data_and_a_torn_progress_line_are_redone(model, tmp_path, monkeypatch, caplog):
    reference = soak.artifact_digest(_quantize(model, tmp_path / "ref"))
    partial = _interrupted(model, tmp_path / "out", monkeypatch, 30)
    records = [json.loads(line) for line in (partial / LEDGER_NAME).read_text().splitlines()]
    victim = records[5]  # a finished unit: overwrite the middle of its first output in the shard file
    out_name = next(iter(victim["outputs"]))
    shard = partial / "model-00001-of-00001.safetensors"
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    start, end = json.loads(shard.read_bytes()[8:8 + header_len])[out_name]["data_offsets"]
    with open(shard, "r+b") as f:
        f.seek(8 + header_len + (start + end) // 2)
        f.write(b"\x55\x66\x77")
    with open(partial / LEDGER_NAME, "a") as f:
        f.write('{"unit": "model.layers.9.cut-off-by-the-cra')  # the kill came mid-line
    caplog.set_level(logging.INFO)
    final = _quantize(model, tmp_path / "out")
    assert f"{victim['unit']}: output {out_name} differs from what the earlier run recorded" in caplog.text
    assert _reused(caplog) == 29 and soak.artifact_digest(final) == reference


def test_killed_calibration_leftovers_are_cleaned_under_the_lock(tmp_path, bundled_fixture):
    """Calibration has no resume (it is minutes, not hours); what a killed run leaves is removed by the next."""
    calib = tmp_path / "out" / f"{bundled_fixture.name}-calib"
    (calib / "stepq-act-abc123").mkdir(parents=True)
    (calib / "stepq-act-abc123" / "layer0.npy").write_bytes(b"x" * 100)
    (calib / ".stats.safetensors.tmp-99999").write_bytes(b"half")
    assert main(["calibrate", str(bundled_fixture), "--out", str(tmp_path / "out"), "--num-samples", "2",
                 "--seq-len", "32"]) == 0
    assert sorted(p.name for p in calib.iterdir()) == ["stats.safetensors"]
