"""Fuzz of the readers that face untrusted files (issue 14): safetensors shards, the checkpoint folder (config.json,
model.safetensors.index.json, shard headers), GGUF headers, an artifact's stepq.json and the resume ledgers.

Each case mutates a small copy of a valid file (bit flips, interesting bytes and integers, truncation, extension,
JSON-level edits: wrong types, huge or negative numbers, NaN, overlapping offsets, duplicate keys, deep nesting) and
opens it with the real reader. The reader must either read it (and then read its tensors) or raise BadInput with one
line naming the file; any other exception, a case over its time budget, or an allocation far beyond the file's size
fails the test with the reader, seed and mutations, reproducible with
`.venv/bin/python bench/fuzz_soak.py --reader READER --seed SEED --cases 1`.

Deterministic: case i of reader r always draws the same mutations. `bench/fuzz_soak.py` runs the same generator for
as many cases as asked.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
import signal
import struct
import time
import traceback
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from convert.errors import BadInput

# -- ledger adapters: the resume ledgers are being merged into one module; re-point these, not the cases --------

def open_ledger(path: Path) -> list[dict]:
    """The records of a progress ledger, as every resumable job reads its ledger."""
    from convert.ledger import read_records
    return read_records(path)


def stage_ledger(folder: Path):
    """The whole-file stage ledger of a job folder (GGUF export, eval, calibration layers)."""
    from convert.ledger import Stages
    return Stages(folder)


def resume_writer(final: Path, specs, units: dict[str, tuple[str, list[str]]]) -> int:
    """Resume an interrupted ArtifactWriter of `final` (its plan reopens the ledger); -> how many units were reused."""
    from convert.writer import ArtifactWriter

    class _Stop(Exception):
        pass

    try:
        with ArtifactWriter(final, resumable=True) as w:
            w.plan(specs)
            reused = sum(w.reuse(u, key, outs) for u, (key, outs) in units.items())
            raise _Stop  # never finish: only the reading is under test
    except _Stop:
        return reused


def resume_stages(folder: Path, stages: dict[str, str]) -> int:
    """Open a stage ledger and ask for every stage, as a re-run does; -> how many were reused."""
    progress = stage_ledger(folder)
    try:
        found = [progress.reuse(stage, key) for stage, key in stages.items()]
        progress.recorded([f for files in found if files for f in files])
        return sum(f is not None for f in found)
    finally:
        getattr(progress, "close", lambda: None)()


def resume_calibration(folder: Path, key: str) -> int | None:
    """Open a calibration folder as a re-run with the same key does, and restore from it; -> the last layer kept."""
    from calib.resume import LayerCheckpoints
    cp = LayerCheckpoints(folder)
    cp.open(key, _StubCollector(), force=False)
    got = cp.resume(spill_bytes=1 << 20)
    return None if got is None else got[0]


class _StubCollector:
    """What LayerCheckpoints needs of a StatsCollector: a state to save, somewhere to restore it."""

    def take_state(self) -> dict:
        return {"amax": torch.ones(4)}

    def restore_state(self, state) -> None:
        pass


# -- mutation operators -----------------------------------------------------------------------------------------

INTERESTING_INTS = [0, 1, -1, 7, 8, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
                    2**64 - 1, -(2**63)]
INTERESTING_BYTES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0x22, 0x5C, 0x0A, 0x7B, 0x5B]
HUGE_DIGITS = "9" * 5000  # past Python's int-from-string digit limit: json.loads raises ValueError, not a decode error


def _interesting_json(rng: random.Random):
    return rng.choice([
        0, -1, 1, -(2**63), 2**63, 2**64, 10**40, 1.5, -0.0, math.nan, math.inf, -math.inf, "", "x", "F32", "BF16",
        "I64", "F8_E4M3", "Q4_K", "x" * 5000, None, True, False, [], {}, [0], [-1, 2**62], [2**40, 2**40, 2**40],
        [1, 2, 3, 4, 5, 6, 7, 8, 9], "a\nb", "../../escape", "/etc/passwd", "model.safetensors", [[[[]]]],
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, {"a": {"b": {"c": 1}}}, "\u0000", "\ud800x",
    ])


def _bytes_op(rng: random.Random, b: bytes, focus: int) -> tuple[bytes, str]:
    """One byte-level mutation; `focus` biases positions to the first `focus` bytes (the header)."""
    b = bytearray(b)
    n = len(b)
    pos = lambda: rng.randrange(min(n, focus) if focus and rng.random() < 0.8 else n) if n else 0
    op = rng.choice(["flip", "byte", "int", "truncate", "extend", "delete", "dup", "insert"])
    if op == "flip" and n:
        k = rng.choice([1, 1, 2, 4, 8])
        for _ in range(k):
            i = pos()
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip{k}"
    if op == "byte" and n:
        i, v = pos(), rng.choice(INTERESTING_BYTES)
        for j in range(i, min(n, i + rng.choice([1, 1, 2, 4]))):
            b[j] = v
        return bytes(b), f"byte@{i}={v:#x}"
    if op == "int" and n:
        i = pos() if rng.random() < 0.7 else rng.randrange(0, max(1, min(n, focus or n)), 4)
        width, v = rng.choice([8, 4]), rng.choice(INTERESTING_INTS)
        b[i:i + width] = (v % 2 ** (8 * width)).to_bytes(width, "little")  # negatives as two's complement
        return bytes(b), f"int{width}@{i}={v}"
    if op == "truncate" and n:
        i = pos()
        return bytes(b[:i]), f"truncate@{i}"
    if op == "extend":
        k = rng.choice([1, 7, 8, 64, 4096])
        tail = bytes(rng.randrange(256) for _ in range(k)) if rng.random() < 0.5 else b"\0" * k
        return bytes(b) + tail, f"extend{k}"
    if op == "delete" and n:
        i = pos()
        k = rng.choice([1, 4, 8, 64])
        del b[i:i + k]
        return bytes(b), f"delete{k}@{i}"
    if op == "dup" and n:
        i = pos()
        k = rng.choice([1, 8, 32, 256])
        b[i:i] = b[i:i + k]
        return bytes(b), f"dup{k}@{i}"
    i = pos()
    ins = rng.choice([b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"NaN", b"-", b"1e999", HUGE_DIGITS.encode(),
                      b"\xff\xfe", b"\n"])
    b[i:i] = ins
    return bytes(b), f"insert{ins[:8]!r}@{i}"


class Dup(dict):
    """A JSON object serialised with one of its keys twice (the JSON grammar allows it; readers must cope)."""


def _nodes(obj):
    """Every (parent, key) in a JSON tree, for picking a random place to mutate."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield obj, k
            yield from _nodes(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield obj, i
            yield from _nodes(v)


def _json_op(rng: random.Random, obj) -> tuple[object, str]:
    """One structural mutation of a parsed JSON document (in place where it can be)."""
    nodes = list(_nodes(obj))
    op = rng.choice(["value", "value", "value", "delete", "add", "wrap", "dup", "swap", "root"])
    if op == "root" or not nodes:
        new = rng.choice([[obj], [], "x", 0, None, _interesting_json(rng)])
        return new, f"root={str(new)[:20]}"
    parent, key = rng.choice(nodes)
    if op == "value":
        v = _interesting_json(rng)
        parent[key] = v
        return obj, f"value[{str(key)[:40]}]={str(v)[:20]}"
    if op == "delete":
        del parent[key]
        return obj, f"delete[{str(key)[:40]}]"
    if op == "add":
        v = _interesting_json(rng)
        if isinstance(parent, dict):
            parent[rng.choice(["__metadata__", "extra", "", "a\nb", "unit", "key", "outputs"])] = v
        else:
            parent.insert(rng.randrange(len(parent) + 1), v)
        return obj, f"add[{str(key)[:40]}]={str(v)[:20]}"
    if op == "wrap":
        parent[key] = rng.choice([[parent[key]], {"x": parent[key]}])
        return obj, f"wrap[{str(key)[:40]}]"
    if op == "dup" and isinstance(parent, dict):
        d = Dup(parent)
        d.dup_key, d.dup_value = key, _interesting_json(rng) if rng.random() < 0.5 else parent[key]
        parent.clear()
        return _replace(obj, parent, d), f"dupkey[{str(key)[:40]}]"
    if op == "swap" and isinstance(parent, dict) and len(parent) > 1:
        k2 = rng.choice(list(parent))
        parent[key], parent[k2] = parent[k2], parent[key]
        return obj, f"swap[{str(key)[:40]},{str(k2)[:40]}]"
    parent[key] = _interesting_json(rng)
    return obj, f"value[{str(key)[:40]}]"


def _replace(tree, old, new):
    """`tree` with the (emptied) node `old` replaced by `new`."""
    if tree is old:
        return new
    for parent, key in _nodes(tree):
        if parent[key] is old:
            parent[key] = new
            return tree
    return tree


def dumps(obj) -> str:
    """json.dumps, but writing a Dup's duplicated key, and NaN/Infinity as Python's json does."""
    if isinstance(obj, Dup):
        items = [f"{json.dumps(k)}:{dumps(v)}" for k, v in obj.items()]
        items.append(f"{json.dumps(obj.dup_key)}:{dumps(obj.dup_value)}")
        return "{" + ",".join(items) + "}"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(dumps(v) for v in obj) + "]"
    return json.dumps(obj)


def _text_op(rng: random.Random, text: str) -> tuple[str, str]:
    """Mutations only expressible in the text: deep nesting, number literals past Python's limits."""
    op = rng.choice(["deep", "bignum", "exp"])
    i = rng.randrange(len(text) + 1)
    if op == "deep":
        d = rng.choice([50, 1000, 100_000])
        return text[:i] + "[" * d + "]" * d + text[i:], f"deep{d}@{i}"
    digits = [j for j, c in enumerate(text) if c.isdigit()]
    j = rng.choice(digits) if digits else i
    lit = HUGE_DIGITS if op == "bignum" else rng.choice(["1e999", "-1e999", "NaN", "-Infinity", "1.0e-400"])
    return text[:j] + lit + text[j:], f"{op}@{j}"


def mutate_json_text(rng: random.Random, text: str, ops: list[str], n: int | None = None) -> str:
    """1-3 structural mutations, sometimes followed by a textual one."""
    obj = json.loads(text)
    for _ in range(n or rng.choice([1, 1, 2, 3])):
        obj, what = _json_op(rng, obj)
        ops.append(what)
    out = dumps(obj)
    if rng.random() < 0.15:
        out, what = _text_op(rng, out)
        ops.append(what)
    return out


def mutate_bytes(rng: random.Random, b: bytes, ops: list[str], focus: int = 0) -> bytes:
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        b, what = _bytes_op(rng, b, focus)
        ops.append(what)
    return b


# -- safetensors-specific header mutations ----------------------------------------------------------------------

def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header_text: str, data: bytes, length_delta: int = 0) -> bytes:
    h = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", (len(h) + length_delta) % 2**64) + h + data


def _entry_op(rng: random.Random, header: dict) -> str:
    """A mutation of one tensor entry that keeps the JSON well-formed: the checks a validator must make."""
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return "none"
    name = rng.choice(names)
    e = header[name]
    if not isinstance(e, dict):
        return "none"
    op = rng.choice(["dtype", "shape", "huge_shape", "offsets", "overlap", "swap_offsets", "neg", "bool", "float",
                     "rename", "metadata"])
    if op == "dtype":
        e["dtype"] = rng.choice(["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "Q4", "f32", 5, None])
    elif op == "shape" and isinstance(e.get("shape"), list):
        e["shape"] = rng.choice([e["shape"] + [1], e["shape"][:-1], [d * 2 for d in e["shape"]], [], [0],
                                 list(reversed(e["shape"]))])
    elif op == "huge_shape":
        e["shape"] = rng.choice([[2**40, 2**40], [2**63], [2**64], [2**31] * 4, [10**30]])
    elif op == "offsets" and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
        a, b = e["data_offsets"]
        e["data_offsets"] = rng.choice([[a, b + 1], [a + 1, b], [a, 2**64], [b, a], [a], [a, b, b], [0, 0]])
    elif op == "overlap" and len(names) > 1:
        other = header[rng.choice(names)]
        if isinstance(other, dict):
            e["data_offsets"], e["shape"], e["dtype"] = (other.get("data_offsets"), other.get("shape"),
                                                         other.get("dtype"))
    elif op == "swap_offsets" and len(names) > 1:
        other = header[rng.choice(names)]
        if isinstance(other, dict):
            e["data_offsets"], other["data_offsets"] = other.get("data_offsets"), e.get("data_offsets")
    elif op == "neg":
        e[rng.choice(["shape", "data_offsets"])] = rng.choice([[-1], [-1, 4], [0, -4], [-(2**63), 0]])
    elif op == "bool":
        e[rng.choice(["shape", "data_offsets"])] = [True, True]
    elif op == "float":
        e[rng.choice(["shape", "data_offsets"])] = [1.0, 4.0]
    elif op == "rename":
        header[rng.choice(["a\nb", "", " ", "x" * 300, "\t", name + "\r"])] = header.pop(name)
    elif op == "metadata":
        header["__metadata__"] = rng.choice([[1], "x", {"k": 1}, {"k": None}, 5, {"k": {"n": 1}}, None, {}])
    return f"entry:{op}[{name[:40]}]"


def mutate_safetensors(rng: random.Random, raw: bytes, ops: list[str]) -> bytes:
    header, data = split_safetensors(raw)
    kind = rng.random()
    if kind < 0.45:
        for _ in range(rng.choice([1, 1, 2])):
            ops.append(_entry_op(rng, header))
        delta = 0
        if rng.random() < 0.1:
            delta = rng.choice([-1, 1, 8, 2**63, -8])
            ops.append(f"length{delta:+d}")
        return join_safetensors(dumps(header), data, delta)
    if kind < 0.7:
        return join_safetensors(mutate_json_text(rng, json.dumps(header), ops), data)
    return mutate_bytes(rng, raw, ops, focus=8 + struct.unpack("<Q", raw[:8])[0])


# -- the case runner --------------------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the alarm when one case runs past its budget (BaseException: readers' `except Exception` must not
    swallow it)."""


@dataclass
class Failure:
    reader: str
    seed: int
    ops: list[str]
    error: str

    def __str__(self) -> str:
        return f"{self.reader} seed={self.seed} ops={self.ops}: {self.error}"


@dataclass
class Tally:
    cases: int = 0
    ok: int = 0
    bad_input: int = 0
    seconds: float = 0.0
    memory_checked: int = 0
    failures: list[Failure] = field(default_factory=list)


CASE_BUDGET_S = 10.0  # a hang, not a slow case: the slowest reader needs ~20 ms per case on a loaded machine
# Traced allocations a case may make: per byte of the mutated file (a parsed JSON header's objects take ~20x its
# text) plus a constant for fixed buffers (file hashing reads 16 MiB blocks) and the other, unmutated files a reader
# opens. Declared lengths (2**40 and up) are far beyond it.
MEM_PER_BYTE, MEM_CONSTANT = 200, 64 << 20


def _on_alarm(signum, frame):
    raise Hang()


def _first_frame(tb) -> str:
    """Where an unexpected exception came from: the innermost frame in this project's code, else the innermost."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/site-packages/" not in f.filename and "/lib/python" not in f.filename]
    f = (ours or frames)[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}"


def run_case(reader: str, seed: int, make: Callable, check: Callable, names: Callable, tally: Tally,
             trace_memory: bool = False) -> None:
    """`make(rng, ops)` writes the mutated input and returns (its size, the args for `check`); `check(*args)` runs
    the reader. `names(message)` says whether a BadInput message names the file."""
    rng = random.Random(f"{reader}:{seed}")
    ops: list[str] = []
    tally.cases += 1
    try:
        size, args = make(rng, ops)
    except Exception as e:  # noqa: BLE001 - the generator itself failed: a bug here, not in the reader
        tally.failures.append(Failure(reader, seed, ops, f"generator: {e.__class__.__name__}: {e}"))
        return
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_BUDGET_S)
    if trace_memory:
        tracemalloc.start()
    try:
        check(*args)
        tally.ok += 1
    except BadInput as e:
        msg = str(e)
        if "\n" in msg or "\r" in msg:
            tally.failures.append(Failure(reader, seed, ops, f"BadInput message of several lines: {msg!r}"[:400]))
        elif not names(msg):
            tally.failures.append(Failure(reader, seed, ops, f"BadInput message names no file: {msg!r}"[:400]))
        else:
            tally.bad_input += 1
    except Hang:
        tally.failures.append(Failure(reader, seed, ops, f"hang: still running after {CASE_BUDGET_S} s"))
    except Exception as e:  # noqa: BLE001 - anything but BadInput is what the fuzzer looks for
        where = _first_frame(e.__traceback__)
        tally.failures.append(Failure(reader, seed, ops, f"{e.__class__.__name__} at {where}: {str(e)[:200]!r}"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if trace_memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            tally.memory_checked += 1
            if peak > MEM_PER_BYTE * size + MEM_CONSTANT:
                tally.failures.append(Failure(reader, seed, ops, f"allocated {peak} bytes for a {size}-byte input"))


# -- the readers under test, each on a small valid template -----------------------------------------------------

def _small_safetensors() -> bytes:
    """Every dtype family the reader knows, a 3-D stack (read per expert), an empty tensor, and metadata."""
    from safetensors.torch import save
    g = torch.Generator().manual_seed(0)
    return save({
        "a.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        "experts": torch.randn(3, 2, 4, generator=g),
        "bias": torch.arange(5, dtype=torch.int64),
        "fp8": torch.zeros(2, 16, dtype=torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False]),
    }, metadata={"format": "pt"})


def _read_all_safetensors(path: Path) -> None:
    from convert.safetensors_io import SafetensorsFile
    f = SafetensorsFile(path)
    try:
        assert isinstance(f.metadata, dict), f"metadata is {type(f.metadata).__name__}, not a dict"
        for name, e in f.entries.items():
            t = f.read(name)
            assert t.numel() * t.element_size() == e.nbytes
            if len(e.shape) == 3 and e.shape[0]:
                f.read_expert(name, e.shape[0] - 1)
    finally:
        f.close()


TINY_CONFIG = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_attention_groups": 1, "head_dim": 8,
    "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 2,
                                "num_attention_groups": 1, "head_dim": 8},
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention"], "rope_theta": [1e4] * 3,
    "partial_rotary_factors": [1.0] * 3, "moe_layers_enum": "1", "moe_num_experts": 2, "moe_intermediate_size": 16,
    "share_expert_dim": 16, "swiglu_limits": [0.0] * 3, "swiglu_limits_shared": [0.0] * 3, "num_nextn_predict_layers": 1,
}
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


PER_LAYER_KEYS = ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared")


def _config_op(rng: random.Random, cfg: dict, ops: list[str]) -> str:
    """Sizes that drive what the reader builds before it looks at any weight: layer counts (per-layer tables),
    expert counts and dimensions (expected shapes), with the per-layer lists that would bound them dropped."""
    key = rng.choice(["num_hidden_layers", "num_nextn_predict_layers", "moe_num_experts", "hidden_size",
                      "vocab_size", "head_dim", "moe_intermediate_size", "num_attention_heads"])
    cfg[key] = rng.choice([0, -1, -(2**63), 2**31, 10**6, 10**12, 2**64, 1.5, "8"])
    ops.append(f"config:{key}={cfg[key]}")
    if rng.random() < 0.5:
        for k in PER_LAYER_KEYS:
            cfg.pop(k, None)
        ops.append("config:drop-per-layer")
    return json.dumps(cfg)


def _read_checkpoint(model_dir: Path) -> None:
    from convert.checkpoint import open_checkpoint
    ckpt = open_checkpoint(model_dir)
    try:
        for t in ckpt:
            x = ckpt.read(t.info.name)
            if x.dim() == 3:
                ckpt.read_expert(t.info.name, x.shape[0] - 1)
            ckpt.shard_identity(t.shard)
    finally:
        ckpt.close()


def _small_gguf(path: Path) -> None:
    """A few keys of every value type (strings, arrays of strings and numbers) and tensors of three types."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(path, "step35")
    w.add_name("fuzz")
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_float32("step35.rope.freq_base", 10000.0)
    w.add_bool("step35.flag", True)
    w.add_token_list(["<s>", "</s>", "a", "b", "ab"])
    w.add_token_scores([0.0, -1.0, -2.0, -3.0, -4.0])
    w.add_array("step35.layers", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((5, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(32, dtype=np.float32).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _read_gguf(path: Path) -> None:
    from convert.gguf_export import read_gguf
    r = read_gguf(path)
    for f in r.fields.values():
        f.contents()
    for t in r.tensors:
        if t.data.size:
            t.data.reshape(-1)[[0, -1]]  # the first and last element are inside the mapping


@dataclass
class Readers:
    """Templates (built once per session) and, per reader, how to make and check one case."""

    root: Path
    st_raw: bytes = b""
    ckpt: Path | None = None
    gguf_raw: bytes = b""
    artifact: Path | None = None
    ledgers: Path | None = None
    specs: dict[str, Callable] = field(default_factory=dict)

    def case_dir(self, reader: str) -> Path:
        d = self.root / "cases" / reader
        d.mkdir(parents=True, exist_ok=True)
        return d


def build_readers(root: Path) -> Readers:
    """Write every template under `root` and register the readers' case makers."""
    from convert.fixtures import BUNDLED_FIXTURE, fixture_config, write_random_checkpoint

    R = Readers(root)
    R.st_raw = _small_safetensors()

    # safetensors shard on its own
    st_path = R.case_dir("safetensors") / "shard.safetensors"

    def make_st(rng, ops):
        raw = mutate_safetensors(rng, R.st_raw, ops)
        st_path.write_bytes(raw)
        return len(raw), (st_path,)

    R.specs["safetensors"] = (make_st, _read_all_safetensors, lambda m: str(st_path) in m)

    # the checkpoint folder: one of config.json, the index, a shard header or a shard's bytes is mutated
    R.ckpt = write_random_checkpoint(root / "tiny-ckpt", fixture_config(**TINY_CONFIG), seed=0)
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(BUNDLED_FIXTURE / name, R.ckpt / name)
    originals = {p.name: p.read_bytes() for p in R.ckpt.iterdir()}
    ck = R.case_dir("checkpoint") / "model"
    shutil.copytree(R.ckpt, ck, dirs_exist_ok=True)
    touched: list[str] = []

    def make_ckpt(rng, ops):
        for name in touched:  # restore what the previous case mutated
            (ck / name).write_bytes(originals[name])
        touched.clear()
        target = rng.choice(["config.json", INDEX, S1, S2, S1])
        ops.append(target)
        raw = originals[target]
        if target == "config.json" and rng.random() < 0.3:
            out = _config_op(rng, json.loads(raw), ops).encode()
        elif target.endswith(".json"):
            out = (mutate_json_text(rng, raw.decode(), ops).encode("utf-8", "surrogatepass") if rng.random() < 0.7
                   else mutate_bytes(rng, raw, ops))
        else:
            out = mutate_safetensors(rng, raw, ops)
        (ck / target).write_bytes(out)
        touched.append(target)
        return len(out), (ck,)

    R.specs["checkpoint"] = (make_ckpt, _read_checkpoint, lambda m: str(ck) in m)

    # GGUF header and tensor table
    gg = root / "template.gguf"
    _small_gguf(gg)
    R.gguf_raw = gg.read_bytes()
    gg_path = R.case_dir("gguf") / "model.gguf"
    tensor_data_at = _gguf_data_offset(gg)

    def make_gguf(rng, ops):
        raw = mutate_bytes(rng, R.gguf_raw, ops, focus=tensor_data_at)
        gg_path.write_bytes(raw)
        return len(raw), (gg_path,)

    R.specs["gguf"] = (make_gguf, _read_gguf, lambda m: str(gg_path) in m)

    # an artifact's stepq.json (and its index), as the artifact reader, the gate and the model card read them
    R.artifact = _tiny_artifact(R.ckpt, root / "out")
    art_orig = {n: (R.artifact / n).read_bytes() for n in ("stepq.json", INDEX)}
    art = R.case_dir("stepq-json") / R.artifact.name
    shutil.copytree(R.artifact, art)
    decisions = json.loads(art_orig["stepq.json"])["tensors"]
    # one of each kind of decision: kept, a quantized linear, a quantized expert stack
    sample = sorted({d["action"] + str(len(d.get("shape", []))): n for n, d in decisions.items()}.values())

    def make_art(rng, ops):
        target = "stepq.json" if rng.random() < 0.85 else INDEX
        ops.append(target)
        for n, raw in art_orig.items():
            (art / n).write_bytes(raw)
        raw = art_orig[target]
        out = (mutate_json_text(rng, raw.decode(), ops).encode("utf-8", "surrogatepass") if rng.random() < 0.8
               else mutate_bytes(rng, raw, ops))
        (art / target).write_bytes(out)
        return len(out), (art, sample)

    R.specs["stepq-json"] = (make_art, _read_artifact, lambda m: str(art) in m)

    return R


def _tiny_artifact(ckpt: Path, out: Path) -> Path:
    """An NVFP4A16 artifact of the tiny checkpoint, made by the real command (kept, linear and expert decisions)."""
    from stepq.cli import main
    with contextlib.redirect_stdout(io.StringIO()):  # the command prints the artifact's path
        assert main(["quantize", str(ckpt), "--scheme", "nvfp4a16", "--out", str(out)]) == 0
    return out / f"{ckpt.name}-NVFP4A16"


def ledger_cases(root: Path):
    """Templates of the three ledgers as their writers leave them after an interruption (through the writers' own
    APIs, so they follow the ledger format), and a case maker that restores all three and mutates one."""
    from calib.resume import LayerCheckpoints
    from calib.stream import Activations
    from convert.writer import ArtifactWriter, OutSpec

    tpl, case = root / "ledger-templates", root / "cases" / "ledgers"
    case.mkdir(parents=True, exist_ok=True)
    # the safetensors writer, interrupted after two units and a memo
    specs = [OutSpec("a", torch.float32, (4, 4)), OutSpec("b", torch.bfloat16, (2, 8))]
    units = {"u1": ("k1", ["a"]), "u2": ("k2", ["b"])}
    try:
        with ArtifactWriter(tpl / "w" / "out", resumable=True) as w:
            w.plan(specs)
            w.write("a", torch.arange(16, dtype=torch.float32).reshape(4, 4))
            w.commit("u1", "k1", ["a"])
            w.write("b", torch.ones(2, 8, dtype=torch.bfloat16))
            w.commit("u2", "k2", ["b"])
            w.memo("source_sha256", "shard", lambda: "0" * 64)
            raise KeyboardInterrupt  # what a Ctrl-C leaves behind: the temporary folder with its ledger
    except KeyboardInterrupt:
        pass
    # the GGUF export's stages
    stages = stage_ledger(tpl / "g")
    stages.make("bf16", "kb", lambda d: (d / "bf16.gguf").write_bytes(b"GGUF" + bytes(60)))
    stages.make("split", "ks", lambda d: [(d / f"m-{i}.gguf").write_bytes(bytes([i]) * 32) for i in range(2)])
    getattr(stages, "close", lambda: None)()
    # a calibration run, interrupted after layer 1
    cp = LayerCheckpoints(tpl / "c")
    cp.open("K", _StubCollector(), force=False)
    for layer in range(2):
        out = Activations((1, 2, 4), torch.float32, 1 << 20)
        out[:] = torch.full((1, 2, 4), float(layer))
        cp.commit(layer, out)

    ledger_of = {w: next(p for p in (tpl / w).rglob("*.jsonl")) for w in ("w", "g", "c")}
    readers = {
        "w": lambda: resume_writer(case / "w" / "out", specs, units),
        "g": lambda: resume_stages(case / "g", {"bf16": "kb", "split": "ks"}),
        "c": lambda: resume_calibration(case / "c", "K"),
    }

    def make(rng, ops):
        which = rng.choice(list(ledger_of))
        ops.append(which)
        shutil.rmtree(case / which, ignore_errors=True)
        shutil.copytree(tpl / which, case / which)
        path = case / ledger_of[which].relative_to(tpl)
        raw = path.read_bytes()
        if rng.random() < 0.75:  # one record mutated as JSON, the others kept: what a reader meets after a bad edit
            lines = raw.decode().splitlines()
            i = rng.randrange(len(lines))
            ops.append(f"line{i}")
            lines[i] = mutate_json_text(rng, lines[i], ops)
            out = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
        else:
            out = mutate_bytes(rng, raw, ops)
        path.write_bytes(out)
        return len(out), (path, which)

    def check(path: Path, which: str) -> None:
        open_ledger(path)
        readers[which]()

    return make, check, lambda m: str(case) in m


def _read_artifact(art: Path, sample: list[str]) -> None:
    from convert.artifact import ArtifactReader
    from eval.card import build_card
    from eval.gate import _variant

    reader = ArtifactReader(art)
    try:
        for name in sample:
            if name in reader.decisions:
                x = reader.read(name)
                if x.dim() == 3:
                    reader.read_expert(name, x.shape[0] - 1)
        variant = reader.provenance.get("variant")
    finally:
        reader.close()
    report_path = art / "eval" / "report.json"
    _variant(art, {"artifact": {"variant": variant or "NVFP4A16"}}, report_path)
    build_card(art, {"pass": True, "files": {}, "results": []}, "org/name")


def _gguf_data_offset(path: Path) -> int:
    import gguf
    return int(gguf.GGUFReader(path).data_offset)


# 10,300 cases with the ledgers' 1000; per case ~4 ms (safetensors, GGUF) to ~20 ms (a checkpoint folder, an artifact)
READER_CASES = {"safetensors": 4500, "checkpoint": 700, "gguf": 3500, "stepq-json": 600}
LEDGER_CASES = 1000
MEMORY_SAMPLE_EVERY = 25  # tracemalloc slows a case ~3x: one case in 25 is traced


def run_reader(R: Readers, reader: str, cases: int, first_seed: int = 0, memory_every: int = MEMORY_SAMPLE_EVERY
               ) -> Tally:
    make, check, names = R.specs[reader]
    tally = Tally()
    t0 = time.perf_counter()
    for seed in range(first_seed, first_seed + cases):
        run_case(reader, seed, make, check, names, tally,
                 trace_memory=bool(memory_every) and seed % memory_every == 0)
    tally.seconds = time.perf_counter() - t0
    return tally


# -- the tests ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def readers(tmp_path_factory, one_thread) -> Readers:
    return build_readers(tmp_path_factory.mktemp("fuzz"))


def _report(reader: str, tally: Tally) -> str:
    shown = "\n".join(str(f) for f in tally.failures[:15])
    more = f"\n... and {len(tally.failures) - 15} more" if len(tally.failures) > 15 else ""
    return (f"{reader}: {len(tally.failures)} of {tally.cases} cases failed ({tally.ok} read, {tally.bad_input} "
            f"BadInput); reproduce with bench/fuzz_soak.py --reader {reader} --seed SEED --cases 1\n{shown}{more}")


@pytest.mark.parametrize("reader", list(READER_CASES))
def test_fuzzed_input_is_read_or_refused_in_one_line_naming_the_file(readers, reader):
    tally = run_reader(readers, reader, READER_CASES[reader])
    print(f"{reader}: {tally.cases} cases in {tally.seconds:.1f} s ({tally.ok} read, {tally.bad_input} BadInput, "
          f"{tally.memory_checked} memory-traced)")
    assert not tally.failures, _report(reader, tally)
    # A fuzzer whose mutations all fail the same first check tests nothing past it.
    assert tally.bad_input > tally.cases // 4 and tally.ok > 0, _report(reader, tally)


# The ledgers are read by every resumable job: a damaged or edited record must make its unit be redone (or be
# refused in one line), never crash the resume, point outside the job folder, or resume from garbage.
def test_fuzzed_ledgers_are_read_or_refused_in_one_line(tmp_path, one_thread):
    make, check, names = ledger_cases(tmp_path)
    tally = Tally()
    t0 = time.perf_counter()
    for seed in range(LEDGER_CASES):
        run_case("ledgers", seed, make, check, names, tally, trace_memory=seed % MEMORY_SAMPLE_EVERY == 0)
    print(f"ledgers: {tally.cases} cases in {time.perf_counter() - t0:.1f} s ({tally.ok} read, "
          f"{tally.bad_input} BadInput)")
    assert not tally.failures, _report("ledgers", tally)
    assert tally.ok > tally.cases // 4, _report("ledgers", tally)


def _gguf_field_offset(raw: bytes, key: str) -> int:
    """Where the value of the KV `key` starts (after its key string and type) in a GGUF file."""
    i = raw.index(key.encode())
    return i + len(key) + 4


@pytest.mark.parametrize("what,edit", [
    ("safetensors header length 2**63", lambda R: (R.st_raw, [(0, 8, 2**63)])),
    ("safetensors header length 2**40", lambda R: (R.st_raw, [(0, 8, 2**40)])),
    ("GGUF tensor count 2**62", lambda R: (R.gguf_raw, [(8, 8, 2**62)])),
    ("GGUF KV count 2**62", lambda R: (R.gguf_raw, [(16, 8, 2**62)])),
    ("GGUF key length 2**62", lambda R: (R.gguf_raw, [(24, 8, 2**62)])),
    ("GGUF string value length 2**62", lambda R: (R.gguf_raw, [(_gguf_field_offset(R.gguf_raw, "general.name"), 8,
                                                                  2**62)])),
    ("GGUF array of 2**62 int32", lambda R: (R.gguf_raw, [(_gguf_field_offset(R.gguf_raw, "step35.layers") + 4, 8,
                                                             2**62)])),
    ("GGUF array of 2**62 strings", lambda R: (R.gguf_raw, [
        (_gguf_field_offset(R.gguf_raw, "tokenizer.ggml.tokens") + 4, 8, 2**62)])),
    ("GGUF tensor with 2**31 dimensions", lambda R: (R.gguf_raw, [
        (R.gguf_raw.index(b"token_embd.weight") + len(b"token_embd.weight"), 4, 2**31)])),
])
def test_huge_declared_lengths_are_refused_without_allocating_them(readers, what, edit):
    """A length field pointing far past the file must fail on the file's size, not on an allocation of that length:
    traced allocations stay at the file's scale and the case ends within its budget."""
    raw, writes = edit(readers)
    b = bytearray(raw)
    for at, width, value in writes:
        b[at:at + width] = value.to_bytes(width, "little")
    reader = "safetensors" if what.startswith("safetensors") else "gguf"
    path = readers.case_dir("declared") / ("x.safetensors" if reader == "safetensors" else "x.gguf")
    path.write_bytes(bytes(b))
    check = _read_all_safetensors if reader == "safetensors" else _read_gguf
    tally = Tally()
    run_case(what, 0, lambda rng, ops: (len(b), (path,)), check, lambda m: str(path) in m, tally, trace_memory=True)
    assert not tally.failures, tally.failures
    assert tally.bad_input == 1, f"{what}: read as if valid"
