"""`stepq pull`: fetch a model from the Hub (safetensors, config, tokenizer only) or accept a local folder."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from convert.checkpoint import open_checkpoint
from convert.config import SIDE_FILES
from convert.errors import BadInput
from convert.hashing import file_sha256

# Weights only as safetensors: pickled weights (*.bin, *.pt) are never downloaded, let alone loaded.
ALLOW_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "*.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "*.md",
]
TOKENIZER_FILES = list(SIDE_FILES)
LFS_BLOB = re.compile(r"[0-9a-f]{64}")  # the Hub cache names an LFS file's blob by its sha256
VERIFIED = ".stepq-verified"  # beside blobs/ in the cache's repo folder: one stamp per blob whose bytes were hashed


def is_hub_id(model: str) -> bool:
    return not Path(model).exists() and model.count("/") == 1 and not model.startswith((".", "/"))


def pull(model: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Local folder in, the same folder out (validated). Hub id in: resumable snapshot download of the allowed
    files into the Hugging Face cache, then the same validation. Returns the folder."""
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


def verify_lfs_blobs(model: str, snapshot: Path) -> None:
    """Hash every LFS blob the snapshot links to that is not stamped yet; a blob whose bytes do not hash to its name
    is deleted with its link (BadInput), so the next pull downloads it again."""
    # huggingface_hub checks a download's length, never its sha256, and stepq then trusts the blob name as the file's
    # sha256 (convert/hashing.py): so each blob is hashed once, here, and stamped with its size and mtime; a stamp
    # that no longer matches the blob (replaced since) means hashing it again.
    stamps = snapshot.parent.parent / VERIFIED
    for link in sorted(p for p in snapshot.rglob("*") if p.is_symlink()):
        blob = link.resolve()
        if not LFS_BLOB.fullmatch(blob.name) or not blob.is_file():
            continue
        stamp, seen = stamps / blob.name, f"{blob.stat().st_size} {blob.stat().st_mtime_ns}"
        if stamp.is_file() and stamp.read_text() == seen:
            continue
        if file_sha256(blob) != blob.name:  # the blob itself, not the link: file_sha256 would trust a link's name
            blob.unlink()
            link.unlink()
            raise BadInput(f"{model}: {link.relative_to(snapshot)}: downloaded bytes do not match the sha256 the Hub "
                           f"names ({blob.name}); deleted, run the pull again")
        stamps.mkdir(exist_ok=True)
        stamp.write_text(seen)


def resolve_model(model: str, revision: str | None = None) -> Path:
    """What every stage calls on MODEL: a local folder as is, a Hub id through `pull` (cached, so cheap)."""
    return pull(model, revision) if is_hub_id(model) else Path(model)
