"""Nothing unsafe is loaded, nothing outside the model folder is read, and a Hub token never leaves the client.

- The Hub token: `stepq pull` / `quantize` / `calibrate` of a Hub id run against a loopback fake of the Hub's
  download endpoints with HF_TOKEN set to a fresh secret; the fake sees the token arrive (so it really was in use),
  and no output stream and no written file (artifact, statistics, Hugging Face cache) contains it.
- Pickles: a pickle that would leave a marker file when unpickled sits next to the weights; nothing unpickles it,
  `pull` does not even download it.
- Remote code: a tokenizer_config.json `auto_map` pointing at code in the model folder is not run.
- Paths: a Hugging Face cache snapshot (symlinks into that repo's blobs) is accepted; a snapshot file linking into
  another repo's blobs is not (the malformed-input corpus has the plain symlink cases).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from convert.checkpoint import open_checkpoint
from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE, fixture_config, write_random_checkpoint
from convert.hub import ALLOW_PATTERNS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stepq", "convert", "calib", "quant", "eval")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Marker:
    """Unpickling this creates the file at `path`: the proof that something unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_pickle(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> None:
    (folder / name).write_bytes(pickle.dumps(_Marker(marker)))


class FakeHubDownloads:
    """The endpoints `snapshot_download` uses: repo info, file tree, and HEAD/GET of each file (served as LFS files
    named by their sha256, like the Hub's). Records every request's Authorization header; `reject` answers 401."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.auth, self.reject = repos, [], False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, headers: dict | None = None):
                self.send_response(code)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                hub.auth.append(self.headers.get("Authorization"))
                path = unquote(urlsplit(self.path).path)
                if hub.reject:
                    return self._send(401, b'{"error": "Invalid credentials in Authorization header"}')
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
                r = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                repo = hub.repos.get((m or r)[1]) if (m or r) else None
                if repo is None:
                    return self._send(404, b'{"error": "Repository not found"}',
                                      {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"})
                files = sorted(p.name for p in repo.iterdir())
                if m and m[2] == "revision":
                    body = {"id": m[1], "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                if m:
                    tree = [{"type": "file", "path": f, "size": (repo / f).stat().st_size,
                             "oid": hashlib.sha1((repo / f).read_bytes()).hexdigest()} for f in files]
                    return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                data = (repo / r[3]).read_bytes()
                return self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                              "Content-Type": "application/octet-stream"})

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_repo(tmp_path) -> tuple[Path, Path]:
    """A Hub repo's files: random weights with the fixture's config and tokenizer, plus a booby-trapped pickle."""
    repo = write_random_checkpoint(tmp_path / "served" / "rand-step35", fixture_config(), seed=8)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(BUNDLED_FIXTURE / name, repo / name)
    marker = tmp_path / "UNPICKLED"
    _evil_pickle(repo, marker)
    return repo, marker


def _grep(root: Path, secret: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and secret in p.read_bytes():
            hits.append(str(p))
    return hits


def test_hub_token_is_never_printed_or_stored(hub_repo, tmp_path):
    repo, marker = hub_repo
    secret = f"hf_{uuid.uuid4().hex}"
    hub = FakeHubDownloads({"acme/step35-tiny": repo})
    home, out = tmp_path / "hf-home", tmp_path / "out"
    env = {**os.environ, "HF_TOKEN": secret, "HF_ENDPOINT": hub.url, "HF_HOME": str(home),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)

    def stepq(*args):
        return subprocess.run([sys.executable, "-m", "stepq.cli", *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, env=env)
    try:
        runs = {
            "pull": stepq("pull", "acme/step35-tiny"),
            # pull (cached) + calibrate (W4A4 needs statistics) + quantize, in one command
            "quantize": stepq("quantize", "acme/step35-tiny", "--scheme", "nvfp4", "--out", out, "--num-samples", "2",
                              "--seq-len", "32"),
            "missing repo": stepq("pull", "acme/nope"),
        }
        hub.reject = True  # (a cached repo would now be served from the cache, as huggingface_hub does offline)
        runs["token refused"] = stepq("pull", "acme/private")
    finally:
        hub.stop()
    assert f"Bearer {secret}" in hub.auth  # the token was really sent: the test means something
    assert runs["pull"].returncode == 0 and runs["quantize"].returncode == 0, runs["quantize"].stderr
    snapshot = Path(runs["pull"].stdout.strip())
    assert snapshot.is_relative_to(home) and (snapshot / "model-00001-of-00002.safetensors").is_symlink()
    for what in ("missing repo", "token refused"):
        r = runs[what]
        assert r.returncode == 2 and re.fullmatch(r"stepq: error: acme/\S+: cannot download from the Hub .*\n",
                                                   r.stderr), (what, r.stderr)
    for what, r in runs.items():
        assert secret not in r.stdout + r.stderr, what
    # named after the repo, not the snapshot's commit hash
    assert (out / "step35-tiny-NVFP4" / "stepq.json").is_file() and (out / "step35-tiny-calib").is_dir()
    assert _grep(tmp_path, secret.encode()) == []  # artifact, statistics, HF cache, served files
    assert not list(home.rglob("*.bin")) and not marker.exists()  # the pickle was neither fetched nor opened


def test_pull_patterns_never_match_pickles():
    from fnmatch import fnmatch

    for name in ("pytorch_model.bin", "model-00001-of-00002.bin", "consolidated.pt", "model.pth", "x.ckpt",
                 "training_args.bin", "optimizer.pt", "x.pkl"):
        assert not any(fnmatch(name, pat) for pat in ALLOW_PATTERNS), name


def test_weights_beside_a_pickle_are_converted_without_touching_it(tmp_path):
    """A folder with safetensors *and* a booby-trapped pickle: the pickle is ignored, never opened."""
    model = write_random_checkpoint(tmp_path / "m", fixture_config(), seed=2)
    marker = tmp_path / "UNPICKLED"
    for name in ("pytorch_model.bin", "extra.pt", "optimizer.pth"):
        _evil_pickle(model, marker, name)
    from stepq.cli import main

    assert main(["quantize", str(model), "--scheme", "fp8-block", "--out", str(tmp_path / "out")]) == 0
    assert not marker.exists()
    art = tmp_path / "out" / "m-FP8-BLOCK"
    assert not [p.name for p in art.iterdir() if p.suffix in (".bin", ".pt", ".pth")]


def test_tokenizer_auto_map_code_is_not_run(tmp_path):
    from calib.data import load_tokenizer

    model = Path(shutil.copytree(BUNDLED_FIXTURE, tmp_path / "m"))
    marker = tmp_path / "REMOTE-CODE-RAN"
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w')\n"
                                       "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    try:
        load_tokenizer(model)
    except BadInput:
        pass  # refusing is fine too; running the code is not
    assert not marker.exists()


def _fake_hf_cache(tmp_path: Path, repo: str, src: Path) -> Path:
    """`src`'s files laid out as huggingface_hub caches them: blobs named by sha256, snapshot symlinks to them."""
    base = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in src.iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, base / "blobs" / sha)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snap


def test_hf_cache_snapshots_are_inside_their_repo_and_nowhere_else(tmp_path):
    src = write_random_checkpoint(tmp_path / "src", fixture_config(), seed=3)
    snap = _fake_hf_cache(tmp_path, "acme/model", src)
    ckpt = open_checkpoint(snap)
    shard = "model-00001-of-00002.safetensors"
    assert ckpt.shard_identity(shard) == {"sha256": hashlib.sha256((src / shard).read_bytes()).hexdigest()}
    ckpt.close()
    other = _fake_hf_cache(tmp_path, "acme/other", src)
    (snap / shard).unlink()
    (snap / shard).symlink_to(os.path.relpath((other / shard).resolve(), snap))  # into another repo's blobs
    with pytest.raises(BadInput, match=rf"{shard}: symlink points outside the model folder"):
        open_checkpoint(snap)


def test_sources_never_unpickle_or_run_remote_code():
    """A guard against regressions in code review's blind spot: the calls that would break the rules above."""
    forbidden = [r"trust_remote_code\s*=\s*True", r"\btorch\.load\(", r"\bpickle\.loads?\(", r"weights_only\s*=\s*False",
                 r"allow_pickle\s*=\s*True", r"\bUnpickler\b", r"\bjoblib\b", r"\bdill\b"]
    hits = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if any(re.search(f, line) for f in forbidden) and not line.lstrip().startswith("#"):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []
