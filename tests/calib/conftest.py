import pytest

from convert.fixtures import BUNDLED_FIXTURE


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every calibration test runs single-threaded (tests/conftest.py `one_thread`)."""


@pytest.fixture(scope="module")
def model_dir():
    """The trained bundled fixture."""
    return BUNDLED_FIXTURE
