"""Resume of `stepq eval`: the expensive parts (the artifact's outputs, weight error, engine check, tasks) are kept in
`.<artifact>-eval.partial/` beside the artifact as they finish, keyed by what they depend on; a killed eval re-run
skips them and writes the same report; a changed file or setting redoes what depends on it; the report folder
appears whole or not at all, and nothing of the eval's bookkeeping ever lands inside the artifact (the gate judges
every file there). The reference outputs cache is written atomically and recomputed when unreadable; an eval whose
reference outputs would not fit on the disk stops before any work.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval.forward as forward
import eval.measure as measure
import stepq.evaluate as evaluate
from convert.ledger import LEDGER_NAME
from stepq.cli import main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "bench" / "fault_soak.py")
soak = sys.modules.setdefault("fault_soak", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(soak)

NAME = "tiny-step35-FP8-BLOCK"
SMALL = ("--num-samples", "4", "--seq-len", "64", "--no-engine-check")  # seconds per eval on the fixture
KILLS = 3


class Crash(Exception):
    """Stands for the process dying: not bad input, so finished stages are kept."""


@pytest.fixture(scope="module")
def artifact_template(bundled_fixture, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art")
    assert main(["quantize", str(bundled_fixture), "--scheme", "fp8-block", "--out", str(out)]) == 0
    return out / NAME


@pytest.fixture
def artifact(artifact_template, tmp_path) -> Path:
    return Path(shutil.copytree(artifact_template, tmp_path / NAME))


def _eval(artifact: Path, model: Path, *extra: str) -> list[str]:
    return ["eval", str(artifact), "--model", str(model), "--out", str(artifact.parent / "out"), *SMALL, *extra]


def _report(artifact: Path) -> dict:
    """report.json without what describes the run rather than the artifact (wall times)."""
    report = json.loads((artifact / "eval" / "report.json").read_text())
    report.pop("timings")
    return report


def _partial(artifact: Path) -> Path:
    return artifact.parent / f".{artifact.name}-eval.partial"


def _crash(*args, **kwargs):
    raise Crash()


def _crashed(argv: list[str], monkeypatch, where: str) -> None:
    """Run `argv` with `<where>` (a function of stepq.evaluate or eval.measure) dying."""
    monkeypatch.setattr(evaluate if hasattr(evaluate, where) else measure, where, _crash)
    with pytest.raises(Crash):
        main(argv)
    monkeypatch.undo()


@pytest.fixture(scope="module")
def reference(artifact_template, bundled_fixture, tmp_path_factory) -> dict:
    """An uninterrupted eval's report (of a copy: reports name their artifact's path, so they are compared
    without it)."""
    art = Path(shutil.copytree(artifact_template, tmp_path_factory.mktemp("ref") / NAME))
    assert main(_eval(art, bundled_fixture, "--tasks", "")) == 0
    report = _report(art)
    report["artifact"].pop("path")
    return report


def _same_as(reference: dict, artifact: Path) -> bool:
    report = _report(artifact)
    report["artifact"].pop("path")
    return report == reference


def _reused(caplog) -> str | None:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval resumed: ")]
    return lines[-1].removeprefix("eval resumed: ") if lines else None


def test_a_crashed_eval_resumes_from_its_finished_stages(reference, artifact, artifact_template, bundled_fixture,
                                                          monkeypatch, caplog):
    _crashed(_eval(artifact, bundled_fixture, "--tasks", ""), monkeypatch, "weight_error")
    partial = _partial(artifact)
    assert (partial / LEDGER_NAME).is_file() and (partial / "forward.safetensors").is_file()
    assert not (artifact / "eval").exists() and not (artifact.parent / f".{NAME}-eval.lock").exists()
    assert sorted(p.name for p in artifact.iterdir()) == sorted(p.name for p in artifact_template.iterdir())
    caplog.set_level(logging.INFO)
    assert main(_eval(artifact, bundled_fixture, "--tasks", "")) == 0
    assert _reused(caplog) == "forward reused from the interrupted run"
    assert _same_as(reference, artifact) and not partial.exists()


def test_other_tasks_redo_only_the_tasks(artifact, bundled_fixture, monkeypatch, caplog):
    _crashed(_eval(artifact, bundled_fixture, "--tasks", ""), monkeypatch, "publish_report")  # every stage done
    caplog.set_level(logging.INFO)
    assert main(_eval(artifact, bundled_fixture, "--tasks", "tiny_step35_word_order", "--task-limit", "2")) == 0
    assert "tasks: inputs or settings changed since the earlier run" in caplog.text
    assert _reused(caplog) == "forward, weights, engine_check reused from the interrupted run"
    assert set(_report(artifact)["tasks"]) == {"tiny_step35_word_order"}


def test_a_changed_artifact_file_redoes_everything(artifact, bundled_fixture, monkeypatch, caplog):
    _crashed(_eval(artifact, bundled_fixture, "--tasks", ""), monkeypatch, "_tasks")
    (artifact / "generation_config.json").write_text((artifact / "generation_config.json").read_text() + "\n")
    caplog.set_level(logging.INFO)
    assert main(_eval(artifact, bundled_fixture, "--tasks", "")) == 0
    assert "forward: inputs or settings changed since the earlier run" in caplog.text and _reused(caplog) is None


def test_force_starts_over(reference, artifact, bundled_fixture, monkeypatch, caplog):
    _crashed(_eval(artifact, bundled_fixture, "--tasks", ""), monkeypatch, "_tasks")
    caplog.set_level(logging.INFO)
    evaluate.evaluate(artifact, bundled_fixture, artifact.parent / "out", n=4, seq_len=64, tasks=[],
                      engine_check=False, progress=False, force=True)
    assert _reused(caplog) is None and _same_as(reference, artifact)


def test_an_unreadable_reference_cache_is_computed_again(reference, artifact, bundled_fixture, caplog):
    assert main(_eval(artifact, bundled_fixture, "--tasks", "")) == 0
    (cached,) = (artifact.parent / "out" / "tiny-step35-evalref").iterdir()
    logprobs = cached / "logprobs.npy"
    size = logprobs.stat().st_size
    logprobs.write_bytes(logprobs.read_bytes()[:1000])  # a disk error; the eval itself only ever renames whole folders
    caplog.set_level(logging.INFO)
    assert main(_eval(artifact, bundled_fixture, "--tasks", "")) == 0
    assert "cached reference outputs unreadable" in caplog.text
    assert _same_as(reference, artifact) and logprobs.stat().st_size == size
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no temporary folder left


def test_no_room_for_the_reference_outputs_fails_before_any_work(artifact, bundled_fixture, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))
    monkeypatch.setattr(forward, "source_forward", _crash)
    monkeypatch.setattr(forward, "artifact_forward", _crash)
    assert main(_eval(artifact, bundled_fixture, "--tasks", "")) == 2
    cache = artifact.parent / "out" / "tiny-step35-evalref"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stepq: error: {cache}: the BF16 reference outputs need 1.6 MB, 1.0 MB free")  # 4 x 64 x 1536 x 4 B
    assert not cache.exists() and not _partial(artifact).exists() and not (artifact / "eval").exists()


@pytest.mark.soak
def test_sigkill_at_random_points_then_resume(reference, artifact, bundled_fixture):
    """Real `stepq eval` processes killed after a random number of finished stages (or just before publishing);
    the report folder is never seen incomplete, and the finishing run gives the uninterrupted report."""
    cmd = [*soak.STEPQ, *_eval(artifact, bundled_fixture, "--tasks", "")]
    progress = _partial(artifact) / LEDGER_NAME
    watcher = soak.FinalWatcher(artifact / "eval")
    watcher.start()
    rng, kills, resumed, log = random.Random(20261125), 0, 0, artifact.parent / "run.err"
    try:
        while kills < KILLS:
            with open(log, "w") as err:
                p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
            target = _lines(progress) + rng.randint(1, 4)  # 4 stages: forward, weights, engine_check, tasks
            while p.poll() is None and _lines(progress) < target:
                time.sleep(0.002)
            if p.poll() is None:
                time.sleep(rng.uniform(0, 0.3))
                p.send_signal(signal.SIGKILL)
                kills += p.wait() == -signal.SIGKILL
            else:
                assert p.returncode == 0
            resumed += "eval resumed: " in log.read_text()
            hidden = {x.name for x in artifact.parent.iterdir() if x.name.startswith(".")}
            assert hidden <= {f".{NAME}-eval.lock", f".{NAME}-eval.partial"}, hidden
        last = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert last.returncode == 0, last.stderr
        resumed += "eval resumed: " in last.stderr
    finally:
        watcher.stop()
    print(f"eval: {kills} kills, {resumed} resumed runs")
    assert resumed >= 1
    done = sorted(p.name for p in (artifact / "eval").iterdir())
    assert watcher.sightings and all(s == done for s in watcher.sightings)
    assert _same_as(reference, artifact) and not _partial(artifact).exists()


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0
