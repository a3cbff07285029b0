"""`stepq pull ORG/NAME` against the loopback fake Hub (tests/eval/fake_hub.py), as real subprocesses: SIGKILLed
while the weights download and run again, left a corrupted partial, served a corrupt body and a truncated one.

What the installed huggingface_hub (1.33) does, from its source: each download goes to a temporary file with a
name of its own, `blobs/<sha256>.<8 hex>.incomplete`, opened "wb", which becomes `blobs/<sha256>` by a rename once
its length is right, and only then is the snapshot link made (file_download.py `_download_to_tmp_and_move`). So a
killed pull keeps every file it finished, the next one restarts the file in flight from byte 0 without reading the
old partial, which stays behind (only `hf cache prune` removes it); Range requests are sent only within one process,
when a connection breaks, from the last 10 MiB piece written. Nothing checks a download's sha256: stepq does, once
per blob (convert/hub.py `verify_lfs_blobs`).
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

import convert.hub as hub_module
from convert.fixtures import BUNDLED_FIXTURE

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("stepq_tests_fake_hub", ROOT / "tests" / "eval" / "fake_hub.py")
fake_hub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_hub)

REPO = "org/tiny"
WEIGHTS = "model.safetensors"
FIXTURE_FILES = {p.name: p.read_bytes() for p in BUNDLED_FIXTURE.iterdir()}
PIECE = 10 * 1024 * 1024  # huggingface_hub writes a download in pieces of this size (constants.DOWNLOAD_CHUNK_SIZE)
RATE = 6_000_000  # bytes/s: the 24 MB weights take 4 s, the first piece lands after 1.7 s
KILLS = 3
BEYOND_SMALL_FILES = 15_000_000  # a fault offset past every file but the weights, and past their first piece


@pytest.fixture(scope="module")
def hub():
    """The fake Hub holding the bundled fixture as org/tiny, uploaded through huggingface_hub."""
    hub = fake_hub.FakeHub().start()
    api = HfApi(endpoint=hub.url, token="hf_fake")
    api.create_repo(REPO)
    api.upload_folder(folder_path=BUNDLED_FIXTURE, repo_id=REPO)
    yield hub
    hub.stop()


@pytest.fixture
def fresh(hub):
    """The hub with no fault and no request recorded."""
    hub.throttle = hub.cut_body_at = hub.flip_byte_at = None
    hub.requests.clear()
    return hub


class SnapshotWatch:
    """Polls the cache's snapshot folders while a pull runs; `sizes` holds every size seen per file name (-1: a
    link to nothing)."""

    def __init__(self, cache: Path):
        self.root, self.sizes, self._stop = cache / "models--org--tiny" / "snapshots", {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            for entry in self.root.glob("*/*"):
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    size = -1
                self.sizes.setdefault(entry.name, set()).add(size)
            time.sleep(0.005)

    def __enter__(self) -> SnapshotWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def partial_sightings(self) -> dict[str, set[int]]:
        return {n: s for n, s in self.sizes.items() if s != {len(FIXTURE_FILES[n])}}


def start_pull(hub, tmp_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}  # no token, not offline
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.Popen([sys.executable, "-m", "stepq.cli", "pull", REPO, "--cache-dir", str(tmp_path / "cache")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pull(hub, tmp_path: Path) -> subprocess.CompletedProcess:
    proc = start_pull(hub, tmp_path)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def blobs(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "models--org--tiny" / "blobs"


def partials(tmp_path: Path) -> set[Path]:
    return set(blobs(tmp_path).glob("*.incomplete"))


def kill_while_downloading(hub, tmp_path: Path, rng: random.Random) -> Path:
    """Starts a throttled pull, SIGKILLs it at a random moment after the weights' first piece is on disk and before
    they are complete; -> the partial it left."""
    hub.throttle, before = RATE, partials(tmp_path)
    proc = start_pull(hub, tmp_path)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size >= PIECE for p in partials(tmp_path) - before):
        assert proc.poll() is None and time.monotonic() < deadline, f"no partial grew ({proc.communicate()})"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 1.2))  # the rest of the weights takes 2.3 s at RATE
    assert proc.poll() is None, "the pull finished before the kill"
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    hub.throttle = None
    (partial,) = partials(tmp_path) - before
    return partial


def weights_gets(requests: list[dict]) -> list[dict]:
    return [r for r in requests if r["method"] == "GET" and r["path"].endswith(f"/{WEIGHTS}")]


def assert_snapshot_is_the_fixture(snapshot: Path):
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == FIXTURE_FILES


def test_pull_survives_sigkills_mid_download(fresh, tmp_path):
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown on failure, to replay the same kill points
    rng, killed, requests_of_killed_runs, done_before_kill = random.Random(seed), [], [], set()
    with SnapshotWatch(tmp_path / "cache") as watch:
        for _ in range(KILLS):
            fresh.requests.clear()
            killed.append(kill_while_downloading(fresh, tmp_path, rng))
            requests_of_killed_runs += fresh.requests
            done_before_kill |= {p.name for p in watch.root.glob("*/*")}
            assert killed[-1].stat().st_size % PIECE == 0 and killed[-1].stat().st_size > 0
        fresh.requests.clear()
        run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    assert_snapshot_is_the_fixture(Path(run.stdout.strip()))
    assert set(watch.sizes) == set(FIXTURE_FILES)  # the watch saw every file appear...
    assert watch.partial_sightings() == {}  # ...and none before it was complete
    # file-level resume: what a killed run finished is not fetched again
    assert WEIGHTS not in done_before_kill and len(done_before_kill) == len(FIXTURE_FILES) - 1
    assert not any(r["path"].endswith(tuple(f"/{n}" for n in done_before_kill)) for r in fresh.requests)
    # the weights restart from byte 0: huggingface_hub never reopens a partial it did not write in this process
    (final,) = weights_gets(fresh.requests)
    assert final["range"] is None and final["sent"] == len(FIXTURE_FILES[WEIGHTS])
    assert partials(tmp_path) == set(killed)  # each kill left its partial behind, linked from nowhere
    wasted = sum(r.get("sent", 0) for r in weights_gets(requests_of_killed_runs))
    print(f"{KILLS} kills at {[p.stat().st_size for p in killed]} bytes on disk; {wasted} bytes served to killed "
          f"runs, then {final['sent']} from byte 0")


def test_a_corrupted_partial_is_never_read(fresh, tmp_path):
    partial = kill_while_downloading(fresh, tmp_path, random.Random(0))
    spoiled = bytearray(partial.read_bytes())
    spoiled[PIECE // 2: PIECE // 2 + 64] = bytes(b ^ 0xFF for b in spoiled[PIECE // 2: PIECE // 2 + 64])
    partial.write_bytes(spoiled)
    fresh.requests.clear()
    run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    assert_snapshot_is_the_fixture(Path(run.stdout.strip()))
    assert [r["range"] for r in weights_gets(fresh.requests)] == [None]  # fetched whole, the partial ignored
    assert partial.read_bytes() == spoiled


def test_a_corrupt_body_is_caught_deleted_and_fetched_again(fresh, tmp_path):
    fresh.flip_byte_at = BEYOND_SMALL_FILES  # right length, right headers, one byte wrong: huggingface_hub keeps it
    run = pull(fresh, tmp_path)
    sha = fake_hub.tree_entry(WEIGHTS, FIXTURE_FILES[WEIGHTS])["lfs"]["oid"]
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == (f"stepq: error: {REPO}: {WEIGHTS}: downloaded bytes do not match the sha256 the Hub names "
                          f"({sha}); deleted, run the pull again\n")
    assert not (blobs(tmp_path) / sha).exists() and partials(tmp_path) == set()
    snapshot = next((tmp_path / "cache" / "models--org--tiny" / "snapshots").iterdir())
    assert not (snapshot / WEIGHTS).is_symlink()
    fresh.flip_byte_at = None
    fresh.requests.clear()
    run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    assert_snapshot_is_the_fixture(Path(run.stdout.strip()))
    assert len(weights_gets(fresh.requests)) == 1


def test_a_truncated_body_fails_on_one_line_and_leaves_nothing(fresh, tmp_path):
    fresh.cut_body_at = BEYOND_SMALL_FILES  # Content-Length says 24 MB, the connection closes after 15 MB
    run = pull(fresh, tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"stepq: error: {REPO}: cannot download from the Hub (RemoteProtocolError: ")
    assert run.stderr.count("\n") == 1
    snapshot = next((tmp_path / "cache" / "models--org--tiny" / "snapshots").iterdir())
    assert not (snapshot / WEIGHTS).exists() and not (snapshot / WEIGHTS).is_symlink()
    assert sorted(p.name for p in blobs(tmp_path).iterdir()) == sorted(
        fake_hub.git_blob_id(FIXTURE_FILES[n]) for n in FIXTURE_FILES if n != WEIGHTS)  # no weights, no partial
    # within one process huggingface_hub does resume: its 5 retries ask for the bytes after the piece it wrote
    assert [r["range"] for r in weights_gets(fresh.requests)] == [None] + [f"bytes={PIECE}-"] * 5


def test_a_verified_blob_is_hashed_again_only_once_it_changed(fresh, tmp_path, monkeypatch):
    run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    snapshot, hashed = Path(run.stdout.strip()), []
    monkeypatch.setattr(hub_module, "file_sha256", lambda p: hashed.append(p.name) or p.name)
    hub_module.verify_lfs_blobs(REPO, snapshot)
    assert hashed == []
    blob = (snapshot / WEIGHTS).resolve()
    os.utime(blob, ns=(blob.stat().st_atime_ns, blob.stat().st_mtime_ns + 1))
    hub_module.verify_lfs_blobs(REPO, snapshot)
    assert hashed == [blob.name]
