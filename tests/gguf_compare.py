"""Two GGUF files compared key by key and tensor by tensor (a message naming the first difference), then byte for
byte: how the GGUF tests hold stepq's files against llama.cpp's converter. Loaded by path through the
`gguf_compare` fixture (importlib test mode: helper modules beside the tests are not importable)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def contents(path: Path) -> tuple[list, list]:
    """([(key, value types, value)], [(tensor, shape, type, bytes)]) in file order."""
    r = gguf.GGUFReader(path)
    kv = [(k, [t.name for t in f.types], f.contents()) for k, f in r.fields.items()]
    tensors = [(t.name, [int(x) for x in t.shape], t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors]
    return kv, tensors


def metadata(path: Path) -> dict:
    return {k: v for k, _, v in contents(path)[0]}


def assert_same(ours: Path, ref: Path) -> None:
    kv_o, t_o = contents(ours)
    kv_r, t_r = contents(ref)
    assert [k for k, _, _ in kv_o] == [k for k, _, _ in kv_r], "metadata keys or their order differ"
    for (k, types_o, v_o), (_, types_r, v_r) in zip(kv_o, kv_r):
        assert (types_o, v_o) == (types_r, v_r), f"metadata {k}: ours {types_o} {str(v_o)[:200]}, llama.cpp " \
                                                 f"{types_r} {str(v_r)[:200]}"
    assert [t[0] for t in t_o] == [t[0] for t in t_r], "tensor names or order differ"
    for o, r in zip(t_o, t_r):
        assert o[1:3] == r[1:3], f"tensor {o[0]}: ours {o[1:3]}, llama.cpp {r[1:3]}"
        assert o[3] == r[3], f"tensor {o[0]}: bytes differ"
    assert ours.read_bytes() == ref.read_bytes(), "same contents but the files differ (layout/padding)"
