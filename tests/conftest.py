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


@pytest.fixture(scope="session")
def tiny_cls_checkpoint(tmp_path_factory, minilm_dir):
    """A small random BERT saved by transformers with MiniLM's tokenizer and no sentence-transformers
    files (so: CLS pooling). Fast enough to train in tests."""
    import shutil

    import torch
    import transformers
    folder = tmp_path_factory.mktemp("tiny_bert")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    return folder


def docstring_records(real_texts, *, count, candidates=6, teacher=True, task="qa", seed=0):
    """Records in the training format made from real text: query = a docstring's first line,
    pos = its body, neg = other docstrings; teacher scores favour the positive."""
    import random
    rng = random.Random(seed)
    usable = [t for t in real_texts if "\n" in t and len(t) > 80]
    out = []
    for i in range(count):
        doc = usable[i % len(usable)]
        first, body = doc.split("\n", 1)
        negs = rng.sample([t for t in usable if t != doc], candidates - 1)
        record = {"query": first, "pos": [body[:400]], "neg": [n[:400] for n in negs], "task": task,
                  "answers": [body[:80]]}
        if teacher:
            record["teacher_scores"] = [0.0] + [-1.0 - rng.random() for _ in negs]
        out.append(record)
    return out


@pytest.fixture(scope="session")
def docstring_jsonl(tmp_path_factory, real_texts):
    """A qa-format JSONL file of 32 records from stdlib docstrings."""
    import json
    path = tmp_path_factory.mktemp("docstring_data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in docstring_records(real_texts, count=32)))
    return path
