"""A loopback fake of the Hub endpoints huggingface_hub calls to create a repo, a branch and a commit, and to
download a file: enough to publish for real against it and inspect what arrived.

Every file is declared "regular" at preupload, so the client inlines content (base64) in the commit instead of
using LFS or Xet. Repos keep one file tree per branch; a commit to a missing branch is a 404, as on the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.requests: list[dict] = []  # {"method", "path", "authorization"} of every request
        self.bodies: list[bytes] = []  # every request body, as received
        self.commits: list[dict] = []  # {"repo", "revision", "create_pr", "summary", "description", "files"}
        self.validated: list[str] = []  # README contents sent to /api/validate-yaml
        self.reject_token = False  # answer every write with 401, as the Hub does for a bad token
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
            hub.requests.append({"method": self.command, "path": self.path,
                                 "authorization": self.headers.get("Authorization")})
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

        def do_GET(self):
            self._record()
            path = unquote(urlsplit(self.path).path)
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                branch = hub.repos.get(m[1], {}).get("branches", {}).get(m[2])
                if branch is None or m[3] not in branch:
                    return self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
                data = branch[m[3]]
                oid = hashlib.sha1(m[1].encode() + m[2].encode()).hexdigest()
                return self._send(200, data, {"X-Repo-Commit": oid, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'},
                                  ctype="application/octet-stream")
            self._json({"error": f"unhandled GET {path}"}, 404)

        do_HEAD = do_GET

    return Handler
