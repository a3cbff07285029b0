import json
import subprocess
from pathlib import Path

import pytest
import torch

from convert.fixtures import BUNDLED_FIXTURE, fixture_config, write_random_checkpoint
from convert.gguf_tools import llama_cpp_dir

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"


@pytest.fixture
def random_ckpt(tmp_path) -> Path:
    """A random checkpoint with the bundled fixture's config, in two shards with an index."""
    return write_random_checkpoint(tmp_path / "rand-step35", fixture_config(), seed=1)


@pytest.fixture
def real_config() -> dict:
    return json.loads((DATA / "step35_flash_config.json").read_text())


@pytest.fixture(scope="session")
def bundled_fixture() -> Path:
    return BUNDLED_FIXTURE


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: OpenMP hand-offs between threads cost more than the math (20x when the cores are busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """The llama.cpp tools and Python binding, built (or reused from the cache) through `make llama-cpp`: never
    skipped, a failed build fails the tests that need it."""
    p = subprocess.run(["make", "--no-print-directory", "llama-cpp"], cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"make llama-cpp failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return llama_cpp_dir()


class ConstantStats:
    """Made-up calibration statistics: input absmax 2.0 for every module and expert, 10 tokens each (schemes that
    need an input scale per module, where the load or layout is what a test checks, not the values)."""

    sha256, meta = "0" * 64, {"fake": True}

    def input_amax(self, module, expert=None):
        return torch.tensor(2.0)

    def tokens(self, module, expert=None):
        return 10


@pytest.fixture(scope="session")
def constant_stats() -> ConstantStats:
    return ConstantStats()


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM 0.33.0 env's python, built through `make vllm-env` when missing: never skipped, a failed build fails
    the tests that need it."""
    from eval.vllm_conformance import VllmEnvError, ensure_vllm_env

    try:
        return ensure_vllm_env()
    except VllmEnvError as e:
        pytest.fail(f"vLLM env: {e}", pytrace=False)


def _test_helper(name: str):
    """tests/<name>.py, by path (importlib test mode: helper modules beside the tests are not importable)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stepq_tests_{name}", Path(__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gguf_compare():
    """tests/gguf_compare.py: `contents`, `metadata`, `assert_same` for two GGUF files."""
    return _test_helper("gguf_compare")


@pytest.fixture(scope="session")
def vision_reference():
    """tests/vision_reference.py: vLLM's Perception Encoder formula in plain torch (`perception_encoder`)."""
    return _test_helper("vision_reference")


RAY_OBJECT_STORE_BYTES = 80 << 20  # per node: small, so results that outgrow it are spilled, as on a busy cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster started for the tests: a head without CPUs (nothing runs beside the driver) and two
    1-CPU worker nodes, each its own raylet with a bounded object store. Stopped after the session."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": RAY_OBJECT_STORE_BYTES, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=RAY_OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()

