"""Calibration data: N sequences of L tokens, sampled deterministically from a local file/folder or a Hub dataset.

Rows with chat `messages` go through the model's own chat template; rows with a `text` column (or a single string
column) and plain `.txt` files are used as they are. Documents are taken in a seeded random order, tokenized until
twice the needed tokens are at hand, packed into one stream, and N aligned L-token windows are drawn from it with the
same seed: the seed changes which windows are used even for a single text file, and a huge dataset is never
tokenized whole.

Image sets (a Step-3.7 checkpoint with its vision tower): a .jsonl/.json file whose rows name images,
`{"image": "a.png", "text": "..."}` or `{"images": ["a.png", "b.jpg"], "text": "..."}` (paths relative to the file),
or a folder where each image `name.png` has its text beside it in `name.txt` (and .jsonl files in it may name images
too). A sample is its images, each written as the processor's placeholder tokens (calib.images), then its text and
EOS. Samples are taken in a seeded random order; window i starts at sample i and the samples after it fill it to L
tokens (the last one cut at L), so N <= the number of samples (default: min(the model's default N, samples)). Every
image is decoded when the set is read: one that cannot be is a BadInput naming its sample, before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calib.images import IMAGE_SUFFIXES, ImageRef, ImageRows
from convert.config import SIDE_FILES, load_config, model_file
from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE, BUNDLED_FIXTURES
from convert.hashing import file_sha256

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
FIXTURE_DATA = BUNDLED_FIXTURE.parent / "tiny-step35-data" / "calib.txt"
TXT_BLOCK_CHARS = 16_384  # .txt files are cut into blocks at line ends, so sampling and tokenizing go block-wise
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


@dataclass(frozen=True)
class Defaults:
    dataset: str
    n: int
    seq_len: int


# The real model: what llm-compressor and ModelOpt do for large MoE models. llm-compressor 0.14
# (`args/dataset_arguments.py`, NVFP4 MoE examples `quantization_w4a4_fp4/qwen_30b_a3b.py`): ultrachat_200k
# `train_sft`, chat-templated, 512 samples ("a good place to start") x MAX_SEQUENCE_LENGTH 2048; ModelOpt 0.47
# `hf_ptq.py`: --calib_size 512; the community Step-3.5 NVFP4 (tacos4me) used 512 ultrachat x 2048 tokens.
# 1M tokens also covers llama.cpp's imatrix (100-300K tokens). See shared/reference/eval-and-publish.md §6.
MODEL_DEFAULTS = Defaults("HuggingFaceH4/ultrachat_200k:train_sft", 512, 2048)
# The bundled tiny fixture: its own held-out text, 64 x 256 = 16K tokens (of ~97K), seconds on a laptop CPU.
FIXTURE_DEFAULTS = Defaults(str(FIXTURE_DATA), 64, 256)


def defaults_for(model_dir: str | Path) -> Defaults:
    """Fixture defaults for the bundled tiny models (or a copy with one's config.json; the Step-3.7 fixture shares
    the Step-3.5 fixture's text stack and text), real-model defaults otherwise."""
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if any(model_dir.resolve() == f.resolve() for f in BUNDLED_FIXTURES):
        return FIXTURE_DEFAULTS
    try:
        raw = json.loads(cfg.read_text())
        same = any(raw == json.loads((f / "config.json").read_text()) for f in BUNDLED_FIXTURES)
    except (OSError, ValueError):
        same = False  # a missing or broken config.json is reported by whoever opens the checkpoint
    return FIXTURE_DEFAULTS if same else MODEL_DEFAULTS


def resolve_settings(model_dir, dataset: str | None, n: int | None, seq_len: int | None) -> tuple[str, int, int]:
    d = defaults_for(model_dir)
    dataset = str(dataset) if dataset else d.dataset
    if not n and dataset != d.dataset and (samples := _image_sample_count(dataset)):
        n = min(d.n, samples)  # an image set: one window starts at each sample
    n, seq_len = n or d.n, seq_len or d.seq_len
    if n <= 0 or seq_len <= 1:
        raise BadInput(f"calibration needs N >= 1 sequences of L >= 2 tokens (got N={n}, L={seq_len})")
    return dataset, n, seq_len


# ---- dataset sources -------------------------------------------------------------------------------------------

@dataclass
class Source:
    """Where the rows come from: local files (hashed for provenance) or a Hub dataset id."""

    id: str
    files: list[Path] = field(default_factory=list)
    hub_split: str | None = None
    samples: list[ImageSample] | None = None  # an image set's samples (None: a text set)

    @property
    def is_hub(self) -> bool:
        return not self.files

    def fingerprint(self) -> dict:
        """id + sha256 of every file: what a statistics file records, and what `matches` compares."""
        if self.is_hub:
            return {"id": self.id, "kind": "hub", "split": self.hub_split, "files": {}, "sha256": None}
        root = self.files[0].parent if len(self.files) == 1 else Path(self.id)
        images = sorted({p for s in self.samples or [] for p in s.images} - set(self.files))
        files = {os.path.relpath(p, root): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in [*self.files, *images] if p.is_file()}  # a missing image is reported when it is read
        combined = hashlib.sha256(json.dumps(sorted((k, v["sha256"]) for k, v in files.items())).encode()).hexdigest()
        return {"id": self.id, "kind": "local", "files": files, "sha256": combined}


def open_source(dataset: str) -> Source:
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise BadInput(f"{path}: unsupported dataset file type {path.suffix or '(none)'!r} "
                           f"(use {', '.join(SUFFIXES)} or a Hub dataset id)")
        return Source(str(path), [path], samples=_image_rows(path) if _names_images(path) else None)
    if path.is_dir():
        visible = [p for p in sorted(path.rglob("*"))
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in visible):
            return _image_folder(path, visible)
        files = [p for p in visible if p.suffix in SUFFIXES]
        if not files:
            raise BadInput(f"{path}: dataset folder holds no {', '.join(SUFFIXES)} files")
        return Source(str(path), files)
    if _HUB_ID.match(dataset) and not dataset.endswith(SUFFIXES):
        repo, _, split = dataset.partition(":")
        return Source(dataset, hub_split=split or None)
    raise BadInput(f"{dataset}: dataset not found (neither a local file/folder nor a Hub dataset id org/name[:split])")


# ---- documents ---------------------------------------------------------------------------------------------------
# A document is ("text", str, separated) or ("chat", messages); text rows are joined with EOS, .txt blocks are not.

def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data[:65536]:
        raise BadInput(f"{path}: binary file, not text (NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text (byte {e.start})")


def _txt_blocks(path: Path) -> list[tuple]:
    text = _read_text(path)
    blocks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + TXT_BLOCK_CHARS)
        end = len(text) if end < 0 else end + 1
        blocks.append(("text", text[start:end], False))
        start = end
    return blocks


def _json_rows(path: Path) -> list:
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # JSON Lines saved as .json: parsed below
        if isinstance(obj, list):
            return obj
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) == 1:  # {"data": [...]}, as `datasets` and many exports write it
                return lists[0]
            raise BadInput(f"{path}: JSON object without a single list of rows")
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}: line {i}: not valid JSON ({e.msg})")
    return rows


def _parquet_rows(path: Path) -> list:
    with open(path, "rb") as f:
        if f.read(4) != b"PAR1":
            raise BadInput(f"{path}: not a parquet file (no PAR1 magic)")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInput(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise BadInput(f"{path}: unreadable parquet ({e.__class__.__name__}: {str(e).splitlines()[0]})")


def row_docs(rows, where: str) -> list[tuple]:
    """Rows -> documents: `messages` -> chat; `text` (or the only string column) -> text."""
    rows = [r for r in rows if r is not None]
    if not rows:
        raise BadInput(f"{where}: no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise BadInput(f"{where}: rows must be JSON objects (with `messages` or a `text` column)")
    if all("messages" in r for r in rows):
        for i, r in enumerate(rows):
            m = r["messages"]
            if not (isinstance(m, list) and m and all(isinstance(x, dict) and "role" in x and "content" in x
                                                       for x in m)):
                raise BadInput(f"{where}: row {i}: `messages` must be a list of {{role, content}} objects")
        return [("chat", r["messages"]) for r in rows]
    if all(isinstance(r.get("text"), str) for r in rows):
        column = "text"
    else:
        strings = [k for k, v in rows[0].items() if isinstance(v, str)]
        if len(strings) != 1 or not all(isinstance(r.get(strings[0]), str) for r in rows):
            cols = ", ".join(rows[0]) or "none"
            raise BadInput(f"{where}: no usable text column (need `messages`, `text` or exactly one string column; "
                           f"columns: {cols})")
        column = strings[0]
    return [("text", r[column], True) for r in rows if r[column].strip()]


def local_docs(source: Source) -> list[tuple]:
    docs = []
    for path in source.files:
        if path.suffix == ".txt":
            docs += _txt_blocks(path)
        else:
            docs += row_docs(_parquet_rows(path) if path.suffix == ".parquet" else _json_rows(path), str(path))
    if not docs:
        raise BadInput(f"{source.id}: dataset is empty")
    return docs


class _HubRows:
    """Hub dataset rows through `datasets` (never used by tests; needs network or the HF cache)."""

    def __init__(self, source: Source, seed: int):
        try:
            import datasets
        except ImportError:
            raise BadInput(f"{source.id}: Hub datasets need the `datasets` package (pip install datasets)")
        repo = source.id.split(":")[0]
        try:
            ds = datasets.load_dataset(repo, split=source.hub_split) if source.hub_split else datasets.load_dataset(repo)
        except Exception as e:  # network, auth, unknown split: one line naming the dataset
            raise BadInput(f"{source.id}: cannot load Hub dataset ({e.__class__.__name__}: {str(e).splitlines()[0]})")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
        if len(ds) == 0:
            raise BadInput(f"{source.id}: dataset is empty")
        self.ds, self.where = ds.shuffle(seed=seed), source.id

    def __iter__(self) -> Iterator[tuple]:
        for start in range(0, len(self.ds), 256):
            yield from row_docs(self.ds.select(range(start, min(start + 256, len(self.ds)))).to_list(), self.where)


# ---- image sets ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSample:
    where: str               # names the sample in messages: "<file> line 3" or "<folder>/cat.png"
    images: tuple[Path, ...]
    text: str


def _first_row(path: Path):
    """The first row of a .jsonl/.json file (None when it has none or is not JSON): enough to tell an image set."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        return json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        return None  # reported by the text reader
        return None
    if path.suffix == ".json":
        try:
            rows = _json_rows(path)
        except BadInput:
            return None
        return rows[0] if rows else None
    return None


def _names_images(path: Path) -> bool:
    row = _first_row(path)
    return isinstance(row, dict) and ("image" in row or "images" in row)


def _image_rows(path: Path) -> list[ImageSample]:
    """Rows {"image": path | "images": [paths], "text": str}; image paths relative to the file's folder."""
    rows = [r for r in _json_rows(path) if r is not None]
    samples = []
    for i, r in enumerate(rows, 1):
        where = f"{path} row {i}"
        if not isinstance(r, dict):
            raise BadInput(f"{where}: not a JSON object")
        images = r.get("images", [r["image"]] if "image" in r else None)
        if not (isinstance(images, list) and all(isinstance(x, str) and x for x in images)):
            raise BadInput(f"{where}: `image` must be a path, `images` a list of paths")
        if not isinstance(r.get("text"), str):
            raise BadInput(f"{where}: no `text` string beside the images")
        samples.append(ImageSample(where, tuple(path.parent / x for x in images), r["text"]))
    if not samples:
        raise BadInput(f"{path}: no rows")
    return samples


def _image_folder(path: Path, visible: list[Path]) -> Source:
    """A folder with images: `name.<image>` + `name.txt` pairs, and .jsonl/.json files whose rows name images."""
    samples, files = [], []
    named: set[Path] = set()
    for f in visible:
        if f.suffix in (".jsonl", ".json"):
            if not _names_images(f):
                raise BadInput(f"{f}: an image folder's .jsonl/.json files must name images (rows with `image`)")
            rows = _image_rows(f)
            samples += rows
            named |= {p.resolve() for s in rows for p in s.images}
            files.append(f)
    texts = {f.with_suffix(""): f for f in visible if f.suffix == ".txt"}
    for f in visible:
        if f.suffix.lower() in IMAGE_SUFFIXES:
            txt = texts.pop(f.with_suffix(""), None)
            if txt is not None:
                samples.append(ImageSample(str(f), (f,), _read_text(txt)))
                files += [txt]
            elif f.resolve() not in named:
                raise BadInput(f"{f}: no text for this image ({f.with_suffix('.txt').name} beside it, or a .jsonl "
                               f"row naming it)")
    if texts:
        raise BadInput(f"{next(iter(texts.values()))}: a text file without an image beside it in an image folder")
    if other := [f for f in visible if f.suffix in (".parquet",)]:
        raise BadInput(f"{other[0]}: an image folder takes image + .txt pairs and .jsonl files only")
    return Source(str(path), sorted(files), samples=samples)


def is_image_set(dataset: str) -> bool:
    """A local dataset whose samples name images (a Hub id, or a path that does not open, is not)."""
    return _image_sample_count(dataset) > 0


def _image_sample_count(dataset: str) -> int:
    """How many samples an image set has (0: not a local image set)."""
    try:
        source = open_source(dataset)
    except BadInput:
        return 0  # reported when the dataset is read
    return len(source.samples or [])


# ---- tokenizer and sampling -----------------------------------------------------------------------------------

def load_tokenizer(model_dir: str | Path):
    model_dir = Path(model_dir)
    for f in {*TOKENIZER_FILES, *SIDE_FILES}:  # BadInput for a file that is a symlink out of the model folder
        model_file(model_dir, f)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise BadInput(f"{model_dir}: no tokenizer in the model folder ({' / '.join(TOKENIZER_FILES[:2])} missing)")
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False: a tokenizer_config.json `auto_map` must never run code from the model folder
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError/OSError/... for broken tokenizer files
        raise BadInput(f"{model_dir / 'tokenizer.json'}: cannot load the tokenizer ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0]})")


@dataclass
class CalibData:
    ids: torch.Tensor  # [N, L] int64
    dataset: dict      # Source.fingerprint()
    n: int
    seq_len: int
    seed: int
    tokens_drawn_from: int  # size of the packed stream the windows were drawn from
    images: ImageRows | None = None  # an image set: the features each row takes at its image-token positions


def _encode(tok, doc: tuple, where: str) -> list[int]:
    if doc[0] == "chat":
        if not tok.chat_template:
            raise BadInput(f"{where}: rows have chat `messages` but the model folder has no chat template "
                           f"(tokenizer_config.json chat_template / chat_template.jinja)")
        text = tok.apply_chat_template(doc[1], tokenize=False)  # the template writes BOS and turn markers itself
    else:
        text = doc[1]
    ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    if doc[0] == "text" and doc[2] and tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)  # document boundary between packed text rows
    return ids


def load_calibration(model_dir: str | Path, dataset: str | None = None, n: int | None = None,
                     seq_len: int | None = None, seed: int = 0, images: bool = False) -> CalibData:
    """N x L tokens of `dataset` (defaults: `resolve_settings`). `images`: the caller feeds image features (an image
    set is refused otherwise)."""
    dataset, n, seq_len = resolve_settings(model_dir, dataset, n, seq_len)
    source = open_source(dataset)
    tok = load_tokenizer(model_dir)
    rng = random.Random(seed)
    if source.samples is not None:
        if not images:
            raise BadInput(f"{source.id}: an image set; this command takes text only")
        return _image_calibration(Path(model_dir), source, tok, n, seq_len, seed, rng)
    if source.is_hub:
        docs: Iterator[tuple] = iter(_HubRows(source, seed))  # already shuffled with the seed
    else:
        local = local_docs(source)
        rng.shuffle(local)
        docs = iter(local)
    need, budget = n * seq_len, 2 * n * seq_len
    stream: list[int] = []
    for doc in docs:
        stream += _encode(tok, doc, source.id)
        if len(stream) >= budget:
            break
    if len(stream) < need:
        raise BadInput(f"{source.id}: {len(stream)} tokens, not enough for N x L = {n} x {seq_len} = {need}")
    windows = sorted(rng.sample(range(len(stream) // seq_len), n))
    flat = torch.tensor(stream[: (len(stream) // seq_len) * seq_len], dtype=torch.long).view(-1, seq_len)
    return CalibData(flat[windows].contiguous(), source.fingerprint(), n, seq_len, seed, len(stream))


def _image_calibration(model_dir: Path, source: Source, tok, n: int, seq_len: int, seed: int,
                       rng: random.Random) -> CalibData:
    """An image set's windows (see the module docstring) and the features each row takes."""
    from calib.images import (
        IMAGE_TOKEN,
        Preprocessor,
        feature_count,
        image_token_ids,
        open_image,
        placeholder_ids,
        plan,
    )

    vision = load_config(model_dir).vision
    if vision is None:
        raise BadInput(f"{source.id}: an image set, but {model_dir} has no vision tower (a Step-3.7 checkpoint does)")
    pre = Preprocessor.from_dir(model_dir)
    ids = image_token_ids(tok, model_dir, vision.image_token_id)
    samples = list(source.samples)
    rng.shuffle(samples)
    if n > len(samples):
        raise BadInput(f"{source.id}: {len(samples)} image samples, fewer than N = {n} (each window starts at its own "
                       f"sample)")
    refs: list[ImageRef] = []
    encoded: list[tuple[list[int], list[int]]] = []  # per sample: tokens, indices into refs
    for s in samples:
        tokens, mine = [], []
        for p in s.images:
            im = open_image(p, s.where)  # decoded whole here: a bad image stops the run before it starts
            pl = plan(im.width, im.height, pre)
            tokens += placeholder_ids(pl, pre, ids)
            mine.append(len(refs))
            refs.append(ImageRef(p, s.where, pl, feature_count(pl, pre)))
        if len(tokens) > seq_len:
            raise BadInput(f"{s.where}: its images take {len(tokens)} tokens, more than L = {seq_len} (--seq-len)")
        tokens += _encode(tok, ("text", s.text, True), source.id)
        encoded.append((tokens, mine))
    rows, placed = [], []
    for i in range(n):
        row: list[int] = []
        where: list[tuple[int, int, int]] = []
        j = i
        while len(row) < seq_len:  # every sample holds a token at least (EOS or an image), so this ends
            tokens, mine = encoded[j % len(encoded)]
            take = tokens[:seq_len - len(row)]
            left = sum(1 for t in take if t == ids[IMAGE_TOKEN])
            for k in mine:
                if left > 0:
                    where.append((k, 0, min(left, refs[k].features)))
                    left -= refs[k].features
            row += take
            j += 1
        rows.append(row)
        placed.append(where)
    images = ImageRows(refs, placed, pre, ids[IMAGE_TOKEN])
    out = torch.tensor(rows, dtype=torch.long)
    images.check(out)
    return CalibData(out, source.fingerprint(), n, seq_len, seed, sum(len(t) for t, _ in encoded), images)
