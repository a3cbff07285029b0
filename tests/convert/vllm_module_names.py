"""Runs INSIDE the vLLM venv (like eval/vllm_runner.py, whose loading it reuses): the module names of vLLM's
Step-3.5 trunk and MTP drafter built from one artifact, printed as one JSON object `{"ok", "trunk", "mtp"}`.

    python tests/convert/vllm_module_names.py ARTIFACT

tests/convert/test_vllm_names.py checks the role table's vLLM names against them.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
import vllm_runner  # noqa: E402  (first: it selects vLLM's CPU platform before vLLM is imported)
import vllm.model_executor.model_loader as loader  # noqa: E402

built: list[list[str]] = []  # trunk, then drafter: vllm_runner.check builds them in that order
_get_model = loader.get_model


def get_model(**kwargs):
    model = _get_model(**kwargs)
    built.append(sorted(name for name, _ in model.named_modules()))
    return model


loader.get_model = get_model  # vllm_runner.load_one imports it from the module at call time
report = vllm_runner.check(Path(sys.argv[1]).resolve())
print(json.dumps({"ok": report["ok"], "trunk": built[0] if built else [], "mtp": built[1] if len(built) > 1 else []}))
