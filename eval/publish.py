"""`stepq publish`: upload a gated artifact (exactly the files gate.json judged, plus the model card) to the Hub.

Refuses when there is no gate.json, when it did not pass, or when any file changed, appeared or disappeared since.
The upload is one commit (huggingface_hub `create_commit`), so a release appears on the branch all at once; large
files go through the client's LFS/Xet pre-upload, which skips what the Hub already holds when re-run. The token
comes from HF_TOKEN or the user's login via huggingface_hub itself; stepq never reads, prints or stores it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from convert.durable import write_atomic
from convert.errors import BadInput
from eval.gate import CARD, artifact_files, diff_files
from eval.schema import GATE_JSON, REPORT_DIR


class PublishError(Exception):
    """Refused (ungated, failed or changed artifact) or the upload failed: one line starting with which; the CLI
    exits 1."""


@dataclass
class PublishPlan:
    artifact: Path
    repo_id: str
    revision: str | None
    private: bool
    create_pr: bool
    files: list[tuple[str, int, str]]  # (path in repo, size, sha256) of the gated files
    card: bytes
    commit_message: str
    commit_description: str

    @property
    def branch(self) -> str | None:
        """The branch to create if missing (main and PR refs exist already)."""
        r = self.revision
        return r if r and r != "main" and not r.startswith("refs/") else None

    def lines(self) -> list[str]:
        vis = "private" if self.private else "the account's default visibility"
        out = [f"create repo {self.repo_id} (model, {vis}) unless it exists"]
        if self.branch:
            out.append(f"create branch {self.branch} from main unless it exists")
        target = f"{self.repo_id}@{self.revision or 'main'}"
        out.append(f"commit to {target}{' as a pull request' if self.create_pr else ''}: {self.commit_message!r}")
        for path, size, sha in self.files:
            out.append(f"  add {path}  {size} B  sha256 {sha}")
        out.append(f"  add {CARD}  {len(self.card)} B  sha256 {hashlib.sha256(self.card).hexdigest()}  (model card)")
        total = sum(s for _, s, _ in self.files) + len(self.card)
        out.append(f"{len(self.files) + 1} files, {total} bytes")
        return out


@dataclass
class PublishResult:
    plan: PublishPlan
    commit_url: str | None = None
    pr_url: str | None = None
    dry_run: bool = False
    lines: list[str] = field(default_factory=list)


def _load_gate(artifact: Path) -> dict:
    path = artifact / REPORT_DIR / GATE_JSON
    if not path.is_file():
        raise PublishError(f"refused: {artifact}: no {REPORT_DIR}/{GATE_JSON}: run `stepq gate` first")
    try:
        record = json.loads(path.read_text())
        passed, files = record["pass"], record["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PublishError(f"refused: {path}: unreadable ({e.__class__.__name__}): run `stepq gate` again")
    if passed is not True:
        failed = ", ".join(dict.fromkeys(r["rule"] for r in record.get("results", []) if r.get("status") == "fail"))
        raise PublishError(f"refused: {artifact}: the gate failed ({failed or 'see gate.json'})")
    if not isinstance(files, dict) or not files:
        raise PublishError(f"refused: {path}: the gate judged no files: run `stepq gate` again")
    return record


def plan_publish(artifact: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
                 create_pr: bool = False) -> PublishPlan:
    """Check the gate against the files as they are now, build the card; no network."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from eval.card import build_card

    artifact = Path(artifact)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise BadInput(f"--repo-id {repo_id!r}: {str(e).splitlines()[0]}")
    if not artifact.is_dir():
        raise BadInput(f"{artifact}: no such artifact folder")
    record = _load_gate(artifact)
    current = artifact_files(artifact)
    diff = diff_files(record["files"], current)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise PublishError(f"refused: {artifact}: changed since gating: {', '.join(diff[:3])}{more}: "
                           f"run `stepq eval` and `stepq gate` again")
    files = [(rel, (artifact / rel).stat().st_size, sha) for rel, sha in sorted(current.items())]
    card = str(build_card(artifact, record, repo_id, revision)).encode()
    name, variant = record["artifact"]["name"], record["artifact"]["variant"]
    policy = record["policy"]
    message = f"stepq: {name} ({variant}), gate passed"
    gate_sha = hashlib.sha256((artifact / REPORT_DIR / GATE_JSON).read_bytes()).hexdigest()
    description = (f"policy {Path(policy['path']).name} [{policy['section']}] sha256 {policy['sha256']}\n"
                   f"eval/report.json sha256 {record['report']['sha256']}\neval/gate.json sha256 {gate_sha}")
    return PublishPlan(artifact, repo_id, revision, private, create_pr, files, card, message, description)


def publish(artifact: str | Path, repo_id: str, revision: str | None = None, dry_run: bool = False,
            private: bool = False, create_pr: bool = False, endpoint: str | None = None) -> PublishResult:
    """Upload the gated files + model card to `repo_id` (created if missing) on `revision` (a branch, created from
    main if missing), or open a pull request with `create_pr`. `dry_run`: the plan only, nothing sent or written.
    `endpoint`: another Hub (default: HF_ENDPOINT or huggingface.co)."""
    plan = plan_publish(artifact, repo_id, revision, private, create_pr)
    if dry_run:
        return PublishResult(plan, dry_run=True, lines=["dry run: nothing is sent or written"] + plan.lines())

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError

    api = HfApi(endpoint=endpoint)  # token: HF_TOKEN or the stored login, resolved inside huggingface_hub
    ops = []
    for rel, _, sha in plan.files:
        op = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(plan.artifact / rel))
        op.upload_info.sha256 = bytes.fromhex(sha)  # verified against gate.json just now: spare a second full read
        ops.append(op)
    ops.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=plan.card))
    try:
        api.create_repo(repo_id, private=plan.private or None, exist_ok=True)  # None: the namespace's default
        if plan.branch:
            api.create_branch(repo_id, branch=plan.branch, exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=plan.commit_message,
                                 commit_description=plan.commit_description, revision=revision, create_pr=create_pr)
    except (HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, ValueError, OSError) as e:
        raise PublishError(f"upload failed: {repo_id}: {e.__class__.__name__}: {_first_line(e)}")
    write_atomic(plan.artifact / CARD, plan.card)  # the local copy of what was published
    done = f"published {plan.lines()[-1]} to {repo_id}@{revision or 'main'}: {info.pr_url or info.commit_url}"
    return PublishResult(plan, info.commit_url, info.pr_url, lines=[done])


def _first_line(e: Exception) -> str:
    """The error's first line, with the token masked should a server ever echo it back."""
    from huggingface_hub import get_token

    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    token = get_token()
    return line.replace(token, "***") if token else line
