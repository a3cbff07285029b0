"""`stepq pull`: fetch a model from the Hub (safetensors, config, tokenizer only) or accept a local folder."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from convert.checkpoint import open_checkpoint
from convert.config import SIDE_FILES
from convert.durable import replace_durably
from convert.errors import BadInput
from convert.hashing import file_sha256

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoFile

# Weights only as safetensors: pickled weights (*.bin, *.pt) are never downloaded, let alone loaded.
ALLOW_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "*.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "*.md",
    "preprocessor_config.json", "processor_config.json",  # Step-3.7's image processor settings
]
TOKENIZER_FILES = list(SIDE_FILES)
LFS_BLOB = re.compile(r"[0-9a-f]{64}")  # the Hub cache names an LFS file's blob by its sha256
VERIFIED = ".stepq-verified"  # beside blobs/ in the cache's repo folder: one stamp per blob whose bytes were hashed
PARALLEL_DOWNLOADS = 8  # huggingface_hub's snapshot_download default (max_workers)
PARTIAL = ".stepq-partial"  # blobs/<sha256>.stepq-partial: an LFS file's bytes so far, the state a later pull resumes


def is_hub_id(model: str) -> bool:
    return not Path(model).exists() and model.count("/") == 1 and not model.startswith((".", "/"))


def pull(model: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Local folder in, the same folder out (validated). Hub id in: the allowed files into the Hugging Face cache,
    LFS files resumed at the byte where an earlier pull stopped, then the same validation. Returns the folder."""
    if is_hub_id(model):
        import httpx
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        # httpx logs every request at INFO, which the CLI's log level would print: one line per file fetched
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # huggingface_hub warns on each retry of a broken download, twice (its handler and the CLI's): a failure is
        # reported once, by the BadInput below
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        try:
            fetch_lfs_blobs(model, revision, cache_dir)
            # finds every LFS blob in place and only links it; fetches the small files
            folder = Path(snapshot_download(model, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                            cache_dir=cache_dir))
        # TransportError: a connection that broke mid-body after huggingface_hub's own retries
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, httpx.TransportError) as e:
            raise BadInput(f"{model}: cannot download from the Hub ({e.__class__.__name__}: {str(e).splitlines()[0]})")
        verify_lfs_blobs(model, folder)
    else:
        folder = Path(model)
        if not folder.is_dir():
            raise BadInput(f"{model}: neither a local folder nor a Hub repo id (org/name)")
        if revision:
            raise BadInput(f"{model}: --revision applies to Hub ids, not to a local folder")
    open_checkpoint(folder).close()
    return folder


# Why stepq downloads LFS files itself: huggingface_hub 1.33.0 writes each download to a name unique to the process,
# `blobs/<sha256>.<8 hex>.incomplete`, opened for writing from byte 0 (its `hf_hub_download` path), and sends Range
# only on its in-process retries (`http_get`): a pull killed 4 GB into a 5 GB shard restarts it from byte 0 and
# leaves the 4 GB behind. Here the partial has a fixed name, is opened for append and continued with a Range request.
def fetch_lfs_blobs(model: str, revision: str | None, cache_dir: str | None) -> None:
    """Every allowed LFS file at the revision whose blob the cache lacks: downloaded, resumably, verified, into
    `blobs/<sha256>`; huggingface_hub's orphaned partials and stepq's stale ones are deleted first."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    listing = lfs_files_at(model, revision)
    if listing is None:
        return
    commit, files = listing
    root = Path(cache_dir or constants.HF_HUB_CACHE)
    folder = repo_folder_name(repo_id=model, repo_type="model")
    blobs, locks = root / folder / "blobs", root / ".locks" / folder
    blobs.mkdir(parents=True, exist_ok=True)
    locks.mkdir(parents=True, exist_ok=True)
    missing = [f for f in files if not (blobs / f.lfs.sha256).is_file()]
    remove_orphans(blobs, locks, resuming={f.lfs.sha256 for f in missing})
    # several at once, as snapshot_download does: one HTTP stream rarely fills a datacenter link
    pool = ThreadPoolExecutor(max_workers=PARALLEL_DOWNLOADS, thread_name_prefix="stepq-pull")
    try:
        for done in [pool.submit(download_blob, model, commit, f, blobs, locks / f"{f.lfs.sha256}.lock")
                     for f in missing]:
            done.result()  # the first failure is raised; files in flight keep their partials for a re-run
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def lfs_files_at(model: str, revision: str | None) -> tuple[str, list[RepoFile]] | None:
    """(commit id, the allowed LFS files at that commit), one commit for all of them; None when the Hub cannot be
    asked (offline, unreachable, refused): snapshot_download then serves the cached snapshot or reports why not."""
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi()
    try:
        commit = api.repo_info(model, revision=revision or constants.DEFAULT_REVISION).sha
        entries = [e for e in api.list_repo_tree(model, revision=commit, recursive=True)
                   if isinstance(e, RepoFile) and e.lfs is not None]
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx.TransportError):
        return None
    return commit, list(filter_repo_objects(entries, allow_patterns=ALLOW_PATTERNS, key=lambda e: e.path))


def remove_orphans(blobs: Path, locks: Path, resuming: set[str]) -> None:
    """Partials no process is writing: huggingface_hub's `<etag>.<hex>.incomplete` (never reused, see above) and
    stepq's own for blobs this pull does not fetch (already complete, or no longer in the revision)."""
    from filelock import FileLock, Timeout

    stale = list(blobs.glob("*.incomplete")) + [p for p in blobs.glob(f"*{PARTIAL}")
                                                if p.name.removesuffix(PARTIAL) not in resuming]
    for path in stale:
        # the blob's lock, as huggingface_hub takes it (its WeakFileLock with timeout=0 gives up before even trying)
        lock = FileLock(locks / f"{path.name.split('.')[0]}.lock", mode=0o664)
        try:
            with lock.acquire(timeout=0):
                path.unlink(missing_ok=True)
        except Timeout:  # held: a live download is writing it
            continue


def download_blob(model: str, commit: str, file: RepoFile, blobs: Path, lock_path: Path) -> None:
    """One LFS file into `blobs/<sha256>`, continuing its `.stepq-partial` with a Range request, under the lock
    huggingface_hub takes for that blob; bytes that do not hash to the name are deleted (BadInput)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    sha, size = file.lfs.sha256, file.lfs.size
    blob, partial = blobs / sha, blobs / f"{sha}{PARTIAL}"
    with WeakFileLock(lock_path):
        if blob.is_file():  # another process finished it while this one waited for the lock
            return
        if partial.is_file() and partial.stat().st_size > size:  # longer than the file: not a prefix of it
            partial.unlink()
        # identity: a compressed answer would ignore the Range (http_get restarts the partial on any 200)
        headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
        with open(partial, "ab") as f:
            http_get(hf_hub_url(model, file.path, revision=commit), f, resume_size=f.tell(), expected_size=size,
                     headers=headers, displayed_filename=file.path)
        if file_sha256(partial) != sha:
            partial.unlink()
            raise BadInput(sha_mismatch(model, file.path, sha))
        replace_durably(partial, blob)
        stamp_verified(blob)


def sha_mismatch(model: str, path: str, sha: str) -> str:
    return (f"{model}: {path}: downloaded bytes do not match the sha256 the Hub names ({sha}); deleted, run the "
            f"pull again")


def stamp_verified(blob: Path) -> None:
    """Records that the blob's bytes hash to its name, as of its current size and mtime."""
    stamp = blob.parent.parent / VERIFIED / blob.name
    stamp.parent.mkdir(exist_ok=True)
    stamp.write_text(blob_identity(blob))


def blob_identity(blob: Path) -> str:
    return f"{blob.stat().st_size} {blob.stat().st_mtime_ns}"


def verify_lfs_blobs(model: str, snapshot: Path) -> None:
    """Hash every LFS blob the snapshot links to that is not stamped yet; a blob whose bytes do not hash to its name
    is deleted with its link (BadInput), so the next pull downloads it again."""
    # huggingface_hub checks a download's length, never its sha256, and stepq then trusts the blob name as the file's
    # sha256 (convert/hashing.py): so each blob is hashed once, here or as stepq downloads it, and stamped with its
    # size and mtime; a stamp that no longer matches the blob (replaced since) means hashing it again.
    stamps = snapshot.parent.parent / VERIFIED
    for link in sorted(p for p in snapshot.rglob("*") if p.is_symlink()):
        blob = link.resolve()
        if not LFS_BLOB.fullmatch(blob.name) or not blob.is_file():
            continue
        stamp = stamps / blob.name
        if stamp.is_file() and stamp.read_text() == blob_identity(blob):
            continue
        if file_sha256(blob) != blob.name:  # the blob itself, not the link: file_sha256 would trust a link's name
            blob.unlink()
            link.unlink()
            raise BadInput(sha_mismatch(model, str(link.relative_to(snapshot)), blob.name))
        stamp_verified(blob)


def resolve_model(model: str, revision: str | None = None) -> Path:
    """What every stage calls on MODEL: a local folder as is, a Hub id through `pull` (cached, so cheap)."""
    return pull(model, revision) if is_hub_id(model) else Path(model)
