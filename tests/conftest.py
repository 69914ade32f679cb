"""Test setup: 8 fake CPU devices for every test, fixtures on real local text."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

SHARED_TOY = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_embedder_toy"


@pytest.fixture(scope="session")
def toy_dir():
    """The real toy data of all six tasks, when ../shared is beside the checkout."""
    if not SHARED_TOY.is_dir():
        pytest.skip(f"toy data not found at {SHARED_TOY} (../shared is absent outside CI)")
    return SHARED_TOY


@pytest.fixture(scope="session")
def minilm_dir():
    from llm_embedder_jax import assets
    return assets.minilm_dir()


@pytest.fixture(scope="session")
def smollm2_gguf():
    from llm_embedder_jax import assets
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def real_texts():
    """Varied real text from the standard library's docstrings (present on every machine)."""
    import inspect
    import json as json_module
    import textwrap
    texts = []
    for module in (inspect, json_module, textwrap, pathlib, os):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and doc not in texts:
                texts.append(doc)
    return texts
