"""Test-session setup: never touch the network, never write to the user's caches."""

import os

import pytest

# Read by huggingface_hub / datasets when they are imported, so set before any test module imports them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def protoquant_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point ``protoquant_hf.cache.cache_root()`` at a per-session folder (shared by all tests of the session)."""
    previous = os.environ.get("PROTOQUANT_CACHE")
    os.environ["PROTOQUANT_CACHE"] = str(tmp_path_factory.mktemp("protoquant_cache"))
    yield os.environ["PROTOQUANT_CACHE"]
    if previous is None:
        del os.environ["PROTOQUANT_CACHE"]
    else:
        os.environ["PROTOQUANT_CACHE"] = previous
