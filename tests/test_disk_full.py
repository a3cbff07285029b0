"""A full disk or a failing write: one line naming the file, exit code 2, never a broken artifact under its final name.

The disk fills up through RLIMIT_FSIZE in the child process (writes past the limit fail with EFBIG, as ENOSPC would
on a full disk; Python ignores the SIGXFSZ that comes with it). What happens to temporary data (README, "Resume"):
quantize reserves every shard's full size before converting, so a full disk usually stops it there and nothing is
kept; once units are finished, the temporary folder is kept for the same command to resume.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convert.fixtures import fixture_config, write_random_checkpoint
from stepq.cli import main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "bench" / "fault_soak.py")
soak = sys.modules.setdefault("fault_soak", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(soak)

NAME = "rand-step35-FP8-BLOCK"


def _limited(limit: int, *args) -> subprocess.CompletedProcess:
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "stepq.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, preexec_fn=cap, env=env)


def _one_line(stderr: str) -> str:
    """The error line; other lines may only be progress notes (e.g. "resuming"), never a traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("stepq: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert all(line.startswith("stepq: ") for line in stderr.strip().splitlines()), stderr
    return errors[0]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tpl") / "rand-step35", fixture_config(), seed=6)


@pytest.fixture
def model(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "rand-step35"))


@pytest.fixture(scope="module")
def shard_sizes(template, tmp_path_factory) -> list[int]:
    """Sizes of the artifact's shard files (3 MB shards), smallest first."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["quantize", str(template), "--scheme", "fp8-block", "--out", str(out), "--max-shard-size", "3MB"]) == 0
    return sorted(p.stat().st_size for p in (out / NAME).glob("*.safetensors"))


def test_full_disk_at_planning_keeps_nothing(model, tmp_path, shard_sizes):
    """Limits below the largest shard, drawn at random: the reservation of some shard fails, named, and the
    shards already reserved go with the temporary folder."""
    sizes = shard_sizes
    rng = random.Random(5)
    # (from 64 KiB: below that, Python's own start-up fails to probe a temporary directory)
    for limit in [64 << 10] + [rng.randrange(sizes[0], sizes[-1]) for _ in range(2)]:
        out = tmp_path / f"out-{limit}"
        p = _limited(limit, "quantize", model, "--scheme", "fp8-block", "--out", out, "--max-shard-size", "3MB")
        assert p.returncode == 2, p.stderr
        line = _one_line(p.stderr)
        assert f".{NAME}.partial" in line and "File too large" in line and "nothing kept" in line, line
        assert sorted(out.rglob("*")) == [], limit


def test_full_disk_mid_conversion_keeps_finished_work_for_the_resume(model, tmp_path, shard_sizes, monkeypatch):
    """The shard files already exist (an interrupted run), so this run writes into them and fails part way:
    its finished units are kept, and the same command without the limit completes the identical artifact."""
    from convert.writer import ArtifactWriter

    sizes = shard_sizes
    assert main(["quantize", str(model), "--scheme", "fp8-block", "--out", str(tmp_path / "ref"), "--max-shard-size",
                 "3MB"]) == 0
    digest = soak.artifact_digest(tmp_path / "ref" / NAME)  # stepq.json records the source path: same model
    out = tmp_path / "out"
    real, done = ArtifactWriter.commit, []

    def commit(self, *args):  # the first run "dies" after 10 units
        real(self, *args)
        done.append(args[0])
        if len(done) == 10:
            raise KeyboardInterrupt
    monkeypatch.setattr(ArtifactWriter, "commit", commit)
    with pytest.raises(KeyboardInterrupt):
        main(["quantize", str(model), "--scheme", "fp8-block", "--out", str(out), "--max-shard-size", "3MB"])
    monkeypatch.undo()
    limit = sizes[-1] // 2  # writes in the second half of the bigger shards fail
    p = _limited(limit, "quantize", model, "--scheme", "fp8-block", "--out", out, "--max-shard-size", "3MB")
    assert p.returncode == 2, p.stderr
    line = _one_line(p.stderr)
    assert re.search(rf"\.{NAME}\.partial/model-\d+-of-\d+\.safetensors: cannot write \(File too large\); finished "
                     r"work kept in .*: re-run the same command to resume, --force to start over", line), line
    assert not (out / NAME).exists() and (out / f".{NAME}.partial" / ".progress.jsonl").is_file()
    p = subprocess.run([sys.executable, "-m", "stepq.cli", "quantize", str(model), "--scheme", "fp8-block", "--out",
                        str(out), "--max-shard-size", "3MB"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "resumed: " in p.stderr and soak.artifact_digest(out / NAME) == digest


def test_full_disk_while_saving_statistics(tmp_path, bundled_fixture):
    out = tmp_path / "out"
    p = _limited(20_000, "calibrate", bundled_fixture, "--out", out, "--num-samples", "2", "--seq-len", "32")
    assert p.returncode == 2, p.stderr
    line = _one_line(p.stderr)
    assert "tiny-step35-calib/stats.safetensors: cannot write the statistics file" in line and "File too large" in line
    assert sorted(out.rglob("*")) == []  # no statistics, no temporary file, not even the folder

