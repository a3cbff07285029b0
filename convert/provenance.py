"""What every stage records about a run, in one place: tool versions, peak memory, the digest of a key, the identity
of a source file, and the source's files as `stepq.json` lists them."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import resource
from pathlib import Path

DEFAULT_TOOLS = ("stepq", "torch", "transformers", "compressed-tensors", "safetensors", "gguf")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def versions(*dists: str) -> dict[str, str]:
    """Installed versions of `dists` (default `DEFAULT_TOOLS`), from package metadata: importing transformers only
    to read its version costs seconds. Packages that are not installed are left out."""
    out = {}
    for dist in dists or DEFAULT_TOOLS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory so far."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def digest(obj) -> str:
    """sha256 of a JSON-able description (a resume key, a settings fingerprint): key order does not matter."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 of a file in the Hugging Face cache, from its name: huggingface_hub stores LFS files as blobs named
    by their sha256 and links them from the snapshot folder. None for any other file."""
    path = Path(path)
    if not path.is_symlink():
        return None
    real = path.resolve()
    return real.name if real.parent.name == "blobs" and _SHA256.match(real.name) else None


def file_identity(path: Path, header_sha256: str | None = None) -> dict:
    """What says a source file is unchanged without reading it: a Hub blob's hash; else its size, modification time
    and (for a safetensors shard) the hash of its header. Resume keys and cache keys compare these."""
    if (sha := hub_blob_sha256(path)) is not None:
        return {"sha256": sha}
    st = Path(path).stat()
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if header_sha256 is not None:
        ident["header_sha256"] = header_sha256
    return ident


def source_files(model_dir: Path, names: list[str], sha256_of) -> dict[str, dict]:
    """`stepq.json`'s source file list: size and sha256 of each named file that exists; `sha256_of(path)` supplies
    the hash (a background hash of the shards, or a direct read for small files)."""
    out = {}
    for name in names:
        p = Path(model_dir) / name
        if p.is_file():
            out[name] = {"size": p.stat().st_size, "sha256": sha256_of(p)}
    return out
