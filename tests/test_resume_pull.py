"""`stepq pull ORG/NAME` against the loopback fake Hub (tests/eval/fake_hub.py), as real subprocesses: SIGKILLed
while the weights download and run again, left a corrupted partial, served a corrupt body, a truncated one, and a
whole file for a Range request; orphaned partials in the cache. Every run has a token, which must reach the Hub and
nothing else.

huggingface_hub (1.33) restarts a killed download from byte 0 under a new name and leaves the old partial behind
(file_download.py `_download_to_tmp_and_move`). So stepq downloads each LFS file itself (convert/hub.py
`fetch_lfs_blobs`) into `blobs/<sha256>.stepq-partial`, continues it with a Range request, hashes it, renames it to
`blobs/<sha256>`, and then lets snapshot_download link it and fetch the small files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from filelock import FileLock
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
SIZE = len(FIXTURE_FILES[WEIGHTS])  # 24 MB
SHA = hashlib.sha256(FIXTURE_FILES[WEIGHTS]).hexdigest()
PIECE = 10 * 1024 * 1024  # http_get writes in pieces of this size (constants.DOWNLOAD_CHUNK_SIZE): a kill loses one
KILLS = 3
FAULT_AT = 15_000_000  # a fault offset inside the weights' second piece (the other files are smaller)
TOKEN = f"hf_{uuid.uuid4().hex}"


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
    hub.throttle = hub.cut_body_at = hub.flip_byte_at = hub.stall_at = None
    hub.ignore_range = False
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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}  # not offline
    env.update(HF_TOKEN=TOKEN, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.Popen([sys.executable, "-m", "stepq.cli", "pull", REPO, "--cache-dir", str(tmp_path / "cache")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pull(hub, tmp_path: Path) -> subprocess.CompletedProcess:
    proc = start_pull(hub, tmp_path)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def blobs(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "models--org--tiny" / "blobs"


def weights_partial(tmp_path: Path) -> Path:
    return blobs(tmp_path) / f"{SHA}.stepq-partial"


def leftovers(tmp_path: Path) -> set[Path]:
    """Partial downloads in the cache: huggingface_hub's and stepq's."""
    return set(blobs(tmp_path).glob("*.incomplete")) | set(blobs(tmp_path).glob("*.stepq-partial"))


def weights_gets(requests: list[dict]) -> list[dict]:
    return [r for r in requests if r["method"] == "GET" and r["path"].endswith(f"/{WEIGHTS}")]


def range_start(request: dict) -> int:
    return int(request["range"].removeprefix("bytes=").removesuffix("-")) if request["range"] else 0


def kill_at(hub, tmp_path: Path, offset: int) -> int:
    """Starts a pull whose weights body pauses at byte `offset`, SIGKILLs it once every whole piece before that
    byte is on disk; -> the size of the partial it left."""
    partial = weights_partial(tmp_path)
    start = partial.stat().st_size if partial.exists() else 0
    on_disk = start + (offset - start) // PIECE * PIECE
    hub.stall_at = offset
    proc = start_pull(hub, tmp_path)
    deadline = time.monotonic() + 60
    while not (any(r.get("sent") == offset - range_start(r) for r in weights_gets(hub.requests))
               and partial.exists() and partial.stat().st_size == on_disk):
        assert proc.poll() is None and time.monotonic() < deadline, f"no stall at {offset} ({proc.communicate()})"
        time.sleep(0.01)
    proc.kill()
    proc.communicate()
    hub.stall_at = None
    assert proc.returncode == -signal.SIGKILL
    assert partial.stat().st_size == on_disk  # the kill lost only the piece in flight
    return on_disk


def assert_snapshot_is_the_fixture(snapshot: Path):
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == FIXTURE_FILES


def mismatch_line(sha: str) -> str:
    return (f"stepq: error: {REPO}: {WEIGHTS}: downloaded bytes do not match the sha256 the Hub names ({sha}); "
            f"deleted, run the pull again\n")


def test_pull_resumes_at_the_byte_a_sigkill_left(fresh, tmp_path):
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown on failure, to replay the same kill points
    rng, left, served_to_killed = random.Random(seed), [0], 0
    with SnapshotWatch(tmp_path / "cache") as watch:
        for kill in range(KILLS):
            fresh.requests.clear()
            # the first kill keeps at least one piece, so the final run has something to resume
            left.append(kill_at(fresh, tmp_path, rng.randrange(max(left[-1], PIECE if kill == 0 else 0), SIZE)))
            (get,) = weights_gets(fresh.requests)
            assert range_start(get) == left[-2]  # each run continued the partial the previous kill left
            served_to_killed += get["sent"]
            assert leftovers(tmp_path) == {weights_partial(tmp_path)}
        fresh.requests.clear()
        run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    assert_snapshot_is_the_fixture(Path(run.stdout.strip()))
    assert set(watch.sizes) == set(FIXTURE_FILES)  # the watch saw every file appear...
    assert watch.partial_sightings() == {}  # ...and none before it was complete
    (final,) = weights_gets(fresh.requests)
    assert final["range"] == f"bytes={left[-1]}-" and final["sent"] == SIZE - left[-1] < SIZE
    assert leftovers(tmp_path) == set()
    assert (tmp_path / "cache" / "models--org--tiny" / ".stepq-verified" / SHA).is_file()
    # the token went with the weights, and nowhere else: not in the output, not in the cache
    assert final["authorization"] == f"Bearer {TOKEN}" and TOKEN not in run.stdout + run.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    print(f"{KILLS} kills left partials of {left[1:]} bytes ({served_to_killed} bytes served to the killed runs); "
          f"after the last kill {final['sent']} of {SIZE} bytes fetched, {left[-1]} saved")


def test_bad_bytes_in_a_partial_or_a_body_fail_on_one_line_and_are_fetched_again(fresh, tmp_path):
    kept = kill_at(fresh, tmp_path, PIECE + 1000)
    partial = weights_partial(tmp_path)
    spoiled = bytearray(partial.read_bytes())
    spoiled[PIECE // 2] ^= 0xFF
    partial.write_bytes(spoiled)
    fresh.requests.clear()
    run = pull(fresh, tmp_path)
    assert (run.returncode, run.stdout, run.stderr) == (2, "", mismatch_line(SHA))
    assert [r["range"] for r in weights_gets(fresh.requests)] == [f"bytes={kept}-"]  # resumed, then caught
    assert leftovers(tmp_path) == set() and not (blobs(tmp_path) / SHA).exists()
    fresh.flip_byte_at, fresh.requests = FAULT_AT, []  # right length and headers, one byte wrong on the wire
    run = pull(fresh, tmp_path)
    assert (run.returncode, run.stdout, run.stderr) == (2, "", mismatch_line(SHA))
    assert [r["range"] for r in weights_gets(fresh.requests)] == [None]  # from byte 0, then caught
    assert leftovers(tmp_path) == set() and not (blobs(tmp_path) / SHA).exists()
    assert not (tmp_path / "cache" / "models--org--tiny" / "snapshots").exists()  # nothing was ever linked
    fresh.flip_byte_at, fresh.requests = None, []
    run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    assert_snapshot_is_the_fixture(Path(run.stdout.strip()))
    assert [r["range"] for r in weights_gets(fresh.requests)] == [None]


def test_a_truncated_body_fails_on_one_line_and_the_next_pull_resumes_it(fresh, tmp_path):
    fresh.cut_body_at = FAULT_AT  # Content-Length says 24 MB, the connection closes after 15 MB
    run = pull(fresh, tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"stepq: error: {REPO}: cannot download from the Hub (RemoteProtocolError: ")
    assert run.stderr.count("\n") == 1
    # http_get's 5 in-process retries ask for the bytes after the piece written; the piece stays for the next run
    assert [r["range"] for r in weights_gets(fresh.requests)] == [None] + [f"bytes={PIECE}-"] * 5
    assert leftovers(tmp_path) == {weights_partial(tmp_path)} and weights_partial(tmp_path).stat().st_size == PIECE
    assert not (tmp_path / "cache" / "models--org--tiny" / "snapshots").exists()
    fresh.cut_body_at = None
    fresh.requests.clear()
    run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    assert_snapshot_is_the_fixture(Path(run.stdout.strip()))
    (get,) = weights_gets(fresh.requests)
    assert get["range"] == f"bytes={PIECE}-" and get["sent"] == SIZE - PIECE
    assert leftovers(tmp_path) == set()


def test_a_server_that_ignores_range_restarts_the_partial(fresh, tmp_path):
    kept = kill_at(fresh, tmp_path, PIECE + 1000)
    fresh.ignore_range, fresh.requests = True, []
    run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    assert_snapshot_is_the_fixture(Path(run.stdout.strip()))
    (get,) = weights_gets(fresh.requests)
    assert get["range"] == f"bytes={kept}-" and get["sent"] == SIZE  # asked to resume, served (and kept) all
    assert leftovers(tmp_path) == set()


def test_orphans_are_removed_and_a_complete_partial_is_not_fetched_again(fresh, tmp_path):
    blobs(tmp_path).mkdir(parents=True)
    locks = tmp_path / "cache" / ".locks" / "models--org--tiny"
    locks.mkdir(parents=True)
    weights_partial(tmp_path).write_bytes(FIXTURE_FILES[WEIGHTS])  # killed after the download, before the rename
    config_etag = fake_hub.git_blob_id(FIXTURE_FILES["config.json"])
    orphans = [blobs(tmp_path) / f"{SHA}.0a1b2c3d.incomplete",  # huggingface_hub's, left by kills
               blobs(tmp_path) / f"{config_etag}.4e5f6a7b.incomplete",
               blobs(tmp_path) / f"{'e' * 64}.stepq-partial"]  # stepq's, for a blob no longer in the revision
    in_use = blobs(tmp_path) / f"{'f' * 64}.8c9d0e1f.incomplete"
    for path in [*orphans, in_use]:
        path.write_bytes(b"partial")
    with FileLock(locks / f"{'f' * 64}.lock"):  # another process is writing it
        run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    assert_snapshot_is_the_fixture(Path(run.stdout.strip()))
    assert weights_gets(fresh.requests) == []  # only hashed and renamed
    assert leftovers(tmp_path) == {in_use}


def test_a_verified_blob_is_hashed_again_only_once_it_changed(fresh, tmp_path, monkeypatch):
    run = pull(fresh, tmp_path)
    assert run.returncode == 0, run.stderr
    snapshot, hashed = Path(run.stdout.strip()), []
    monkeypatch.setattr(hub_module, "file_sha256", lambda p: hashed.append(p.name) or p.name)
    hub_module.verify_lfs_blobs(REPO, snapshot)
    assert hashed == []  # stamped when downloaded
    blob = (snapshot / WEIGHTS).resolve()
    os.utime(blob, ns=(blob.stat().st_atime_ns, blob.stat().st_mtime_ns + 1))
    hub_module.verify_lfs_blobs(REPO, snapshot)
    assert hashed == [blob.name]
