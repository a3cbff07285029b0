"""ggml's own quantizers (`ggml_quantize_chunk`), called in-process from the `libggml-base` that `make llama-cpp`
builds: the K/IQ-quants of a GGUF come from the very code `llama-quantize` runs, without its BF16 intermediate file.

gguf-py (0.19.0) quantizes only Q8_0/Q4_0/... and a few K types in numpy, slowly and not IQ types; the `llama_cpp`
package would be a second build of the same library. ctypes on the library stepq already builds is the smallest
bridge. ctypes releases the GIL for the call, so pieces quantize on several threads at once; ggml's quantizers are
thread-safe (`ggml_quantize_init` is guarded) and row-independent, so any split of the rows gives the same bytes.
"""

from __future__ import annotations

import ctypes
import threading

import gguf
import numpy as np

from convert.errors import BadInput
from convert.gguf_tools import llama_cpp_dir, tool

LIBRARY = "libggml-base.so"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """libggml-base of the llama.cpp build (BadInput naming `make llama-cpp` when it is not built)."""
    global _lib
    with _lock:
        if _lib is None:
            quantize_tool = tool("llama-quantize")  # the build's stamp and a tool: the library beside it is whole
            path = quantize_tool.parent / LIBRARY
            if not path.is_file():
                raise BadInput(f"{path}: not built; run `make llama-cpp` ({llama_cpp_dir()})")
            lib = ctypes.CDLL(str(path))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            lib.ggml_row_size.restype = ctypes.c_size_t
            lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
            lib.ggml_type_name.restype = ctypes.c_char_p
            lib.ggml_type_name.argtypes = [ctypes.c_int]
            lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
            lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
            lib.ggml_validate_row_data.restype = ctypes.c_bool
            lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
            _lib = lib
    return _lib


def ggml_type(name: str) -> int:
    """The ggml type id of `name` (gguf-py's enum holds ggml's ids), refused in one line when gguf-py or the built
    ggml does not know it (a type newer or older than the build)."""
    try:
        qt = gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise BadInput(f"GGUF type {name}: unknown to gguf-py {gguf.__name__}") from None
    built = library().ggml_type_name(int(qt))
    if built is None or built.decode().upper() != qt.name:
        raise BadInput(f"GGUF type {name}: the built ggml ({llama_cpp_dir()}) does not have it")
    return int(qt)


def row_bytes(qtype: int, n_per_row: int) -> int:
    return int(library().ggml_row_size(qtype, n_per_row))


def requires_imatrix(qtype: int) -> bool:
    return bool(library().ggml_quantize_requires_imatrix(qtype))


def _quantize_rows(qtype: int, rows: np.ndarray, out: np.ndarray, imatrix: np.ndarray | None) -> None:
    lib = library()
    n_rows, n_per_row = rows.shape
    imx = None if imatrix is None else imatrix.ctypes.data
    done = lib.ggml_quantize_chunk(qtype, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, imx)
    if done != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {done} of {out.nbytes} bytes")
    # llama-quantize checks every quantized chunk the same way (NaN/Inf scales from extreme weights)
    if not lib.ggml_validate_row_data(qtype, out.ctypes.data, out.nbytes):
        raise ValueError("quantized rows hold non-finite scales")


def quantize(qtype: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`rows` (float32, n_rows x n_per_row) in ggml type `qtype` -> uint8 (n_rows x row bytes). `imatrix`: the
    importance of each column (float32, n_per_row), the rows' expert's slice for an expert stack. Raises
    ValueError when the rows cannot be quantized (a required imatrix missing, non-finite scales)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (rows.shape[1],):
            raise ValueError(f"imatrix of {imatrix.shape} for rows of {rows.shape[1]}")
    elif requires_imatrix(qtype):
        raise ValueError(f"{gguf.GGMLQuantizationType(qtype).name} needs an importance matrix")
    out = np.empty((rows.shape[0], row_bytes(qtype, rows.shape[1])), dtype=np.uint8)
    _quantize_rows(qtype, rows, out, imatrix)
    return out
