"""Export round trip (ours -> folder -> transformers / sentence-transformers), atomicity, the embed mode."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from llm_embedder_jax import Embedder, tasks
from llm_embedder_jax.export import read_texts

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_dir):
    model = Embedder.from_pretrained(minilm_dir)
    # Perturb the weights so the round trip is checked on parameters that are not the bundled ones.
    model = model.with_params(__import__("jax").tree.map(lambda p: p * 1.01, model.params))
    folder = model.save_pretrained(tmp_path_factory.mktemp("export") / "model")
    return model, folder


def test_transformers_loads_export(exported, real_texts):
    model, folder = exported
    texts = [t[:300] for t in real_texts[:12]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.abs(model.encode(texts) - ref).max() <= 1e-5


def test_sentence_transformers_loads_export_with_prompts(exported, real_texts):
    from sentence_transformers import SentenceTransformer
    model, folder = exported
    st = SentenceTransformer(str(folder), device="cpu")
    texts = [t[:300] for t in real_texts[:12]]
    for task in tasks.TASKS:
        for kind in tasks.KINDS:
            assert st.prompts[f"{task}_{kind}"] == tasks.INSTRUCTIONS[task][kind]
    ours = model.encode(texts, kind="key", task="tool")
    theirs = st.encode(texts, prompt_name="tool_key", convert_to_numpy=True)
    assert np.abs(ours - theirs).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)


def test_reload_export_with_ours(exported, real_texts):
    model, folder = exported
    texts = [t[:100] for t in real_texts[:6]]
    np.testing.assert_allclose(Embedder.from_pretrained(folder).encode(texts), model.encode(texts), atol=1e-6)


def test_failed_export_leaves_nothing_half_written(exported, tmp_path, monkeypatch):
    model, _ = exported
    target = tmp_path / "out"
    model.save_pretrained(target)
    before = sorted(p.name for p in target.rglob("*"))

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(model.tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert sorted(p.name for p in target.rglob("*")) == before   # the old export is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out"]         # no temporary folder left behind


def test_nan_parameters_are_never_exported(exported, tmp_path):
    import jax.numpy as jnp
    model, _ = exported
    params = dict(model.params, embeddings=dict(model.params["embeddings"]))
    params["embeddings"]["word"] = params["embeddings"]["word"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN"):
        model.with_params(params).save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_read_texts_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_texts(good, field="text") == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' is int"):
        read_texts(bad, field="text")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: malformed JSON"):
        read_texts(broken, field="text")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin.txt:2: not valid UTF-8"):
        read_texts(latin, field="text")


def test_embed_mode_end_to_end(tmp_path, minilm_dir):
    texts = ["first line", "second, longer line of text", "Ünïcode"]
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    subprocess.run([sys.executable, "main.py", "--mode=embed", "--config=configs/embed.py",
                    f"--workdir={tmp_path / 'run'}", f"--config.input={source}", "--config.text_field=body",
                    "--config.task=chat", "--config.kind=key"], cwd=ROOT, check=True, capture_output=True)
    vectors = np.load(tmp_path / "run" / "embeddings.npy")
    expected = Embedder.from_pretrained(minilm_dir).encode(texts, kind="key", task="chat")
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
