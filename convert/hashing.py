"""sha256 of source files for provenance, without re-reading what the Hub cache already names by hash."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    # huggingface_hub stores LFS files as blobs named by their sha256 and links them from the snapshot folder.
    real = Path(path).resolve()
    if Path(path).is_symlink() and _SHA256.match(real.name) and real.parent.name == "blobs":
        return real.name
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
