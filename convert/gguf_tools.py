"""The llama.cpp tools stepq drives (`llama-quantize`, `llama-gguf-split`, ...), built by `make llama-cpp` from the
llama.cpp vendored in the llama-cpp-python sdist into a cache outside the repository.

Location: `$LLAMA_CPP_DIR` (same variable as the Makefile), default `~/.cache/stepq/llama.cpp-<version>`; the
tree is `<dir>/src` (with its `gguf-py` and converter), binaries in `<dir>/src/build/bin`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from convert.errors import BadInput

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # vendors ggml-org/llama.cpp@0c1e57098; keep in step with the Makefile
STAMP = ".stepq-built"


def llama_cpp_dir() -> Path:
    env = os.environ.get("LLAMA_CPP_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "stepq" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def llama_cpp_tree() -> Path:
    return llama_cpp_dir() / "src"


def tool(name: str) -> Path:
    d = llama_cpp_dir()
    path = d / "src" / "build" / "bin" / name
    if not (d / STAMP).is_file() or not path.is_file():
        raise BadInput(f"{path}: llama.cpp tools are not built; run `make llama-cpp` (about 16 min on 2 cores, "
                       f"cached in {d}; LLAMA_CPP_DIR= moves the cache)")
    return path


_PRCTL = getattr(ctypes.CDLL(None), "prctl", None)  # resolved here: the child only calls it (no dlopen after fork)
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL when stepq dies, so a killed run leaves no tool writing into the folder
    the next run resumes in."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # stepq died before the prctl took effect
        os._exit(1)


def run(name: str, args: list[str], timeout: float | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool (killed with this process); a non-zero exit raises with the tail of its output."""
    cmd = [str(tool(name)), *map(str, args)]
    parent = os.getpid()
    die_with_parent = (lambda: _die_with_parent(parent)) if _PRCTL is not None else None  # Linux only
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, cwd=cwd,
                       preexec_fn=die_with_parent)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{name} failed (exit {p.returncode}): {' '.join(cmd)}\n{tail}")
    return p


def llama_quantize(src: Path, dst: Path, qtype: str, extra_args: list[str], threads: int | None = None,
                   cwd: Path | None = None):
    """`cwd`: where relative paths in `extra_args` start (llama-quantize records the `--imatrix` path as given)."""
    return run("llama-quantize", [*extra_args, src, dst, qtype, threads or os.cpu_count() or 1], cwd=cwd)


def gguf_split(src: Path, out_prefix: Path, max_bytes: int) -> list[Path]:
    """Split `src` into `<out_prefix>-0000i-of-0000N.gguf` of at most `max_bytes` (whole MB, llama.cpp's unit);
    returns the shards. `src` stays: the caller removes it once the shards are safely recorded."""
    mb = max(1, max_bytes // 1000**2)
    run("llama-gguf-split", ["--split", "--split-max-size", f"{mb}M", src, out_prefix])
    return sorted(out_prefix.parent.glob(f"{out_prefix.name}-*-of-*.gguf"))


# Runs llama.cpp's converter as llama.cpp supports it, with three shims:
# 1. llama.cpp pins transformers==4.57.6, which does not know model_type step3p5, so the converter falls back to
#    reading config.json; transformers 5.17 (this venv) knows it and rewrites the config (drops
#    partial_rotary_factors, renames moe_num_experts, ...), which the converter does not expect. Refuse AutoConfig
#    in the converter only, as 4.57.6 does.
# 2. The converter names the pre-tokenizer from a hash of token ids of vocabularies it was generated for; the
#    fixture's vocabulary is its own (its pre-tokenizer is DeepSeek-V3's), so the hash is unknown. Registering it
#    as deepseek-v3 is what convert_hf_to_gguf_update.py would add for this model.
# 3. `--mmproj` of a Step-3.7 checkpoint: Step3VLVisionModel asserts the vision dims of Step3-VL-10B (stride 2, image
#    728, width 1536, 47 layers), so a test-sized tower stops there. conversion/step3.py is loaded with that one
#    assert statement replaced by `pass` (same line numbers; refused if the assert is not found exactly once); every
#    other line of the converter, including its other asserts, runs unchanged. (`python -O` would strip them all.)
CONVERTER_HARNESS = r"""
import runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree + "/gguf-py", tree]
import conversion.base as base
class _NoAutoConfig:
    @staticmethod
    def from_pretrained(*a, **k):
        raise ValueError("model_type step3p5 is unknown to transformers==4.57.6 (llama.cpp's pin)")
base.AutoConfig = _NoAutoConfig
_pre = base.TextModel.get_vocab_base_pre
def _pre_registered(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        return "deepseek-v3"
base.TextModel.get_vocab_base_pre = _pre_registered
if "--mmproj" in sys.argv:
    import ast, importlib.util
    import conversion
    spec = importlib.util.find_spec("conversion.step3")
    tree_ = ast.parse(open(spec.origin, encoding="utf-8").read(), spec.origin)
    dropped = []
    class _DropDimsAssert(ast.NodeTransformer):
        def visit_Assert(self, node):
            if node.msg is not None and "only validated for Step3-VL-10B" in ast.unparse(node.msg):
                dropped.append(node.lineno)
                return ast.copy_location(ast.Pass(), node)
            return node
    tree_ = _DropDimsAssert().visit(tree_)
    if len(dropped) != 1:
        sys.exit(f"{spec.origin}: the Step3-VL-10B dims assert found {len(dropped)} times, expected once")
    step3 = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = step3
    conversion.step3 = step3
    exec(compile(tree_, spec.origin, "exec"), step3.__dict__)
sys.argv = [tree + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def reference_converter_cmd(model: Path, out_file: Path, *args: str) -> list[str]:
    """The command running llama.cpp's own `convert_hf_to_gguf.py` (this tree's, with its gguf-py) on `model`,
    through CONVERTER_HARNESS; `args` are the converter's (`--outtype bf16`, `--mtp`, ...)."""
    return [sys.executable, "-c", CONVERTER_HARNESS, str(llama_cpp_tree()), str(model), "--outfile", str(out_file),
            *args]
