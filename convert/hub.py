"""`stepq pull`: fetch a model from the Hub (safetensors, config, tokenizer only) or accept a local folder."""

from __future__ import annotations

import logging
from pathlib import Path

from convert.checkpoint import open_checkpoint
from convert.config import SIDE_FILES
from convert.errors import BadInput

# Weights only as safetensors: pickled weights (*.bin, *.pt) are never downloaded, let alone loaded.
ALLOW_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "*.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "*.md",
]
TOKENIZER_FILES = list(SIDE_FILES)


def is_hub_id(model: str) -> bool:
    return not Path(model).exists() and model.count("/") == 1 and not model.startswith((".", "/"))


def pull(model: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Local folder in, the same folder out (validated). Hub id in: resumable snapshot download of the allowed
    files into the Hugging Face cache, then the same validation. Returns the folder."""
    if is_hub_id(model):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        # httpx logs every request at INFO, which the CLI's log level would print: one line per file fetched
        logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            folder = Path(snapshot_download(model, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                            cache_dir=cache_dir))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            raise BadInput(f"{model}: cannot download from the Hub ({e.__class__.__name__}: {str(e).splitlines()[0]})")
    else:
        folder = Path(model)
        if not folder.is_dir():
            raise BadInput(f"{model}: neither a local folder nor a Hub repo id (org/name)")
        if revision:
            raise BadInput(f"{model}: --revision applies to Hub ids, not to a local folder")
    open_checkpoint(folder).close()
    return folder


def resolve_model(model: str, revision: str | None = None) -> Path:
    """What every stage calls on MODEL: a local folder as is, a Hub id through `pull` (cached, so cheap)."""
    return pull(model, revision) if is_hub_id(model) else Path(model)
