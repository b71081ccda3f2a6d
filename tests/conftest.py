import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """CI has 2 shared cores: tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A saved tiny BERT checkpoint (path) for the runner's tests; one per test module."""
    import helpers

    return helpers.save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tokenization cache folder shared by one test module's runs."""
    return str(tmp_path_factory.mktemp("cache"))
