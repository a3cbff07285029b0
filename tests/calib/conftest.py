import pytest
import torch

from convert.fixtures import BUNDLED_FIXTURE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: OpenMP hand-offs between threads cost more than the math (20x on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir():
    """The trained bundled fixture."""
    return BUNDLED_FIXTURE
