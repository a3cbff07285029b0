"""A loopback fake of the Hub endpoints huggingface_hub calls to create a repo, a branch and a commit, and to
download a file or a whole snapshot: enough to publish and pull for real against it and inspect what arrived.

Every file is declared "regular" at preupload, so the client inlines content (base64) in the commit instead of
using LFS or Xet. Repos keep one file tree per branch; a commit to a missing branch is a 404, as on the Hub.

Downloads follow huggingface_hub's protocol (file_download.py get_hf_file_metadata / http_get, hf_api.py
model_info / list_repo_tree): a branch's commit id is a hash of the repo and branch names (commits do not move it);
`*.safetensors` files are served as LFS files (tree entries with `lfs`, `X-Linked-Etag` = sha256, `X-Linked-Size`),
other files as git blobs (ETag = git blob id); `resolve` answers Range requests with 206. No `X-Xet-*` header or
`xetHash` is ever sent, so the client downloads over plain HTTP even with hf_xet installed. Knobs on the hub make a
file body slow (`throttle`), cut short under a full Content-Length (`cut_body_at`) or wrong at one byte
(`flip_byte_at`), as a bad upstream would; pause it at a byte until the client hangs up (`stall_at`), so a test
kills a client at a known offset; or answer a Range request with the whole file (`ignore_range`), as a server or
proxy without range support does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors",)  # stored with git-lfs, as the Hub's default .gitattributes does
BODY_CHUNK = 64 * 1024  # file bodies are written (and throttled) in pieces of this size


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        # {"method", "path", "authorization", "range"} of every request; file bodies add "sent" (bytes written)
        self.requests: list[dict] = []
        self.bodies: list[bytes] = []  # every request body, as received
        self.commits: list[dict] = []  # {"repo", "revision", "create_pr", "summary", "description", "files"}
        self.validated: list[str] = []  # README contents sent to /api/validate-yaml
        self.reject_token = False  # answer every write with 401, as the Hub does for a bad token
        self.throttle: float | None = None  # bytes/s per file body, so a download takes long enough to interrupt
        self.cut_body_at: int | None = None  # file offset where a body stops and the connection closes
        self.flip_byte_at: int | None = None  # file offset of a byte served inverted (length and headers right)
        self.stall_at: int | None = None  # file offset where a body pauses until the client hangs up or this clears
        self.ignore_range = False  # answer a Range request with 200 and the whole file
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        # a short poll interval: shutdown() waits for it, once per test
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]


def commit_id(repo_id: str, branch: str) -> str:
    return hashlib.sha1(repo_id.encode() + branch.encode()).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """What git stores in place of an LFS file."""
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def tree_entry(path: str, data: bytes) -> dict:
    """One file of GET /api/models/{repo}/tree/{rev}, as hf_api.RepoFile reads it."""
    if not is_lfs(path):
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
    pointer = lfs_pointer(data)
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(pointer),
            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}}


def file_headers(repo_id: str, branch: str, path: str, data: bytes) -> dict:
    """What get_hf_file_metadata reads from a resolve answer: the commit, the etag naming the cache blob, the size."""
    headers = {"X-Repo-Commit": commit_id(repo_id, branch), "Accept-Ranges": "bytes"}
    if not is_lfs(path):
        return {**headers, "ETag": f'"{git_blob_id(data)}"'}
    return {**headers, "ETag": f'"{git_blob_id(lfs_pointer(data))}"',
            "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte a `Range: bytes=a-b` / `bytes=a-` header asks for (no header: the whole file); None when
    it cannot be served."""
    if header is None:
        return 0, size - 1
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", header.strip())
    if m is None or int(m[1]) >= size:
        return None
    return int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while n := int(self.rfile.readline().split(b";")[0], 16):
                    out += self.rfile.read(n)
                    self.rfile.readline()
                self.rfile.readline()
                return out
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, code: int = 200):
            self._send(code, json.dumps(obj).encode())

        def _record(self, body: bytes = b"") -> str:
            self.record = {"method": self.command, "path": self.path,
                           "authorization": self.headers.get("Authorization"), "range": self.headers.get("Range")}
            hub.requests.append(self.record)
            hub.bodies.append(body)
            return f"http://{self.headers['Host']}"

        def do_POST(self):
            body = self._body()
            base = self._record(body)
            if hub.reject_token:
                return self._json({"error": "Invalid credentials in Authorization header"}, 401)
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            if path == "/api/repos/create":
                d = json.loads(body)
                repo = "/".join(x for x in (d.get("organization"), d["name"]) if x)
                if repo in hub.repos:
                    return self._json({"error": "You already created this model repo", "url": f"{base}/{repo}"}, 409)
                hub.repos[repo] = {"private": d.get("visibility") == "private" or bool(d.get("private")),
                                   "branches": {"main": {".gitattributes": b""}}}
                return self._json({"url": f"{base}/{repo}"})
            if path == "/api/validate-yaml":
                hub.validated.append(json.loads(body)["content"])
                return self._json({"errors": [], "warnings": []})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
                files = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                             for f in files]})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
                return self._commit(base, m[1], m[2], body, create_pr=query.get("create_pr") == ["1"])
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
                repo = hub.repos.get(m[1])
                if repo is None:
                    return self._json({"error": "Repository not found"}, 404)
                if m[2] in repo["branches"]:
                    return self._json({"error": "Reference already exists"}, 409)
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                repo["branches"][m[2]] = dict(repo["branches"][start])
                return self._json({})
            self._json({"error": f"unhandled POST {path}"}, 404)

        def _commit(self, base: str, repo_id: str, revision: str, body: bytes, create_pr: bool):
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._json({"error": "Repository not found"}, 404)
            if revision not in repo["branches"]:
                return self._json({"error": f"Invalid rev id: {revision}"}, 404)
            lines = [json.loads(x) for x in body.splitlines() if x.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            other = [x["key"] for x in lines if x["key"] not in ("header", "file")]
            if other:  # LFS, deletions, copies: this fake only takes inline files
                return self._json({"error": f"unsupported commit entries {other}"}, 400)
            target, pr_url = revision, None
            if create_pr:
                n = sum(b.startswith("refs/pr/") for b in repo["branches"]) + 1
                target, pr_url = f"refs/pr/{n}", f"{base}/{repo_id}/discussions/{n}"
                repo["branches"][target] = dict(repo["branches"][revision])
            repo["branches"][target].update(files)
            hub.commits.append({"repo": repo_id, "revision": target, "create_pr": create_pr, "files": files,
                                "summary": header.get("summary"), "description": header.get("description")})
            oid = uuid.uuid4().hex + "0" * 8
            self._json({"commitUrl": f"{base}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url})

        def _branch(self, repo_id: str, revision: str) -> str | None:
            """The branch a revision (branch name or commit id) names, None when there is none."""
            branches = hub.repos.get(repo_id, {}).get("branches", {})
            return next((b for b in branches if revision in (b, commit_id(repo_id, b))), None)

        def _no_revision(self, repo_id: str, revision: str):
            if repo_id not in hub.repos:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            self._send(404, f'{{"error": "Invalid rev id: {revision}"}}'.encode(), {"X-Error-Code": "RevisionNotFound"})

        def do_GET(self):
            self._record()
            path = unquote(urlsplit(self.path).path)
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m[1], m[2], m[3])
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                return self._model_info(m[1], m[2])
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
                return self._tree(m[1], m[2])
            self._json({"error": f"unhandled GET {path}"}, 404)

        def _model_info(self, repo_id: str, revision: str):
            branch = self._branch(repo_id, revision)
            if branch is None:
                return self._no_revision(repo_id, revision)
            files = hub.repos[repo_id]["branches"][branch]
            self._json({"id": repo_id, "sha": commit_id(repo_id, branch), "private": hub.repos[repo_id]["private"],
                        "siblings": [{"rfilename": f} for f in sorted(files)]})

        def _tree(self, repo_id: str, revision: str):
            """The whole tree in one page (no Link header): repos here are flat and small."""
            branch = self._branch(repo_id, revision)
            if branch is None:
                return self._no_revision(repo_id, revision)
            files = hub.repos[repo_id]["branches"][branch]
            self._json([tree_entry(f, files[f]) for f in sorted(files)])

        def _resolve(self, repo_id: str, revision: str, path: str):
            branch = self._branch(repo_id, revision)
            files = hub.repos[repo_id]["branches"][branch] if branch is not None else {}
            if path not in files:
                return self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            data = files[path]
            headers = file_headers(repo_id, branch, path, data)
            asked = None if hub.ignore_range else self.headers.get("Range")
            span = byte_range(asked, len(data))
            if span is None:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            (first, last), ranged = span, asked is not None
            if ranged:
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            self.send_response(206 if ranged else 200)
            for k, v in {"Content-Type": "application/octet-stream", "Content-Length": str(last - first + 1),
                         **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self._send_body(data, first, last)

        def _send_body(self, data: bytes, first: int, last: int):
            """Bytes first..last of a file, with the hub's faults applied; stops quietly when the client is gone."""
            body = bytearray(data[first:last + 1])
            if hub.flip_byte_at is not None and first <= hub.flip_byte_at <= last:
                body[hub.flip_byte_at - first] ^= 0xFF
            if hub.cut_body_at is not None:
                del body[max(hub.cut_body_at - first, 0):]  # the connection closes short of Content-Length
            pause = hub.stall_at - first if hub.stall_at is not None and first <= hub.stall_at <= last else None
            self.record["sent"] = 0
            try:
                self._write(body[:pause])
                if pause is not None:
                    self._stall()
                    self._write(body[pause:])
            except (BrokenPipeError, ConnectionResetError):  # a killed client: nothing to answer
                pass

        def _write(self, body: bytes):
            for at in range(0, len(body), BODY_CHUNK):
                piece = body[at:at + BODY_CHUNK]
                self.wfile.write(piece)
                self.record["sent"] += len(piece)
                if hub.throttle:
                    time.sleep(len(piece) / hub.throttle)

        def _stall(self):
            """Waits while `stall_at` is set; a client that hangs up meanwhile ends the body."""
            self.wfile.flush()
            while hub.stall_at is not None:
                if select.select([self.connection], [], [], 0.01)[0] and not self.connection.recv(1, socket.MSG_PEEK):
                    raise ConnectionResetError

        do_HEAD = do_GET

    return Handler
