"""Encoder parity with PyTorch transformers, pooling, instructions and bad input."""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from llm_embedder_jax import Embedder, encoder, tasks


def torch_embeddings(folder, texts, *, pooling, max_length):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if pooling == "mean":
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    else:
        pooled = hidden[:, 0]
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.fixture(scope="module")
def varied_texts(real_texts):
    texts = [t[:400] for t in real_texts[:60]]            # real prose and code, various lengths
    texts += [t * 20 for t in real_texts[60:75]]           # long: truncated at max_length
    texts += ["", "a", "ok.", "Größe, façade, naïve — 東京 🚀", "Привет, мир", "مرحبا بالعالم",
              "tab\tand\nnewline", "  leading spaces", "UPPER lower MiXeD", "1 2 3 4 5 6 7 8 9 10"]
    texts += [f"short text number {i}" for i in range(20)]
    assert len(texts) >= 100
    return texts


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.from_pretrained(minilm_dir)


@pytest.mark.parametrize("batch_size", [7, 64])
def test_minilm_parity_with_transformers(minilm, minilm_dir, varied_texts, batch_size):
    ours = minilm.encode(varied_texts, kind="query", task=None, batch_size=batch_size, max_length=128)
    ref = torch_embeddings(minilm_dir, varied_texts, pooling="mean", max_length=128)
    assert ours.dtype == np.float32 and ours.shape == (len(varied_texts), 384)
    assert np.abs(ours - ref).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_encode_is_in_input_order(minilm):
    texts = ["a much longer text than the others, with several more words in it", "short", "mid length text"]
    together = minilm.encode(texts, batch_size=2)
    one_by_one = np.concatenate([minilm.encode([t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_bucketed_batches_compile_few_shapes(minilm, real_texts):
    before = encoder_cache_size()
    minilm.encode([t[:n] for t in real_texts[:40] for n in (5, 50, 300)], batch_size=16, max_length=128)
    # 120 texts of many lengths: only a handful of bucket shapes may compile.
    assert encoder_cache_size() - before <= 8


def encoder_cache_size():
    from llm_embedder_jax import export
    return export._embed._cache_size()


def test_mesh_encode_equals_single_device(minilm_dir, real_texts):
    from llm_embedder_jax import sharding
    texts = [t[:200] for t in real_texts[:21]]
    single = Embedder.from_pretrained(minilm_dir).encode(texts, batch_size=8)
    sharded = Embedder.from_pretrained(minilm_dir, mesh=sharding.make_mesh()).encode(texts, batch_size=8)
    np.testing.assert_allclose(sharded, single, atol=1e-5)


def test_cls_pooling_small_bert(tiny_cls_checkpoint, real_texts):
    model = Embedder.from_pretrained(tiny_cls_checkpoint)
    assert model.config.pooling == "cls"
    texts = [t[:300] for t in real_texts[:30]]
    ours = model.encode(texts, batch_size=8, max_length=96)
    ref = torch_embeddings(tiny_cls_checkpoint, texts, pooling="cls", max_length=96)
    assert np.abs(ours - ref).max() <= 1e-5


def test_sharded_safetensors_index(tiny_cls_checkpoint, tmp_path, real_texts):
    folder = tmp_path / "sharded"
    model = transformers.BertModel.from_pretrained(str(tiny_cls_checkpoint), add_pooling_layer=False)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_cls_checkpoint / name, folder / name)
    texts = [t[:100] for t in real_texts[:5]]
    np.testing.assert_allclose(Embedder.from_pretrained(folder).encode(texts),
                               Embedder.from_pretrained(tiny_cls_checkpoint).encode(texts), atol=1e-6)


def test_roberta_position_offset(tmp_path, minilm_dir, real_texts):
    config = transformers.RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=130, pad_token_id=0)
    torch.manual_seed(1)
    transformers.RobertaModel(config, add_pooling_layer=False).save_pretrained(tmp_path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    model = Embedder.from_pretrained(tmp_path)
    assert model.config.position_offset == 1
    texts = [t[:200] for t in real_texts[:10]]
    ours = model.encode(texts, batch_size=4, max_length=64)
    assert np.abs(ours - torch_embeddings(tmp_path, texts, pooling="cls", max_length=64)).max() <= 1e-5


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("kind", tasks.KINDS)
def test_instruction_is_prepended(minilm, task, kind):
    text = "How do rotary embeddings work?"
    with_task = minilm.encode([text], kind=kind, task=task)
    by_hand = minilm.encode([tasks.INSTRUCTIONS[task][kind] + text], kind=kind, task=None)
    np.testing.assert_allclose(with_task, by_hand, atol=1e-6)
    assert np.abs(with_task - minilm.encode([text], task=None)).max() > 1e-3


def test_query_and_key_instructions_differ(minilm):
    q = minilm.encode(["same text"], kind="query", task="qa")
    k = minilm.encode(["same text"], kind="key", task="qa")
    assert np.abs(q - k).max() > 1e-3


def test_bad_task_and_kind(minilm):
    with pytest.raises(ValueError, match="unknown task 'search'"):
        minilm.encode(["x"], task="search")
    with pytest.raises(ValueError, match="unknown kind 'doc'"):
        minilm.encode(["x"], kind="doc", task="qa")


def test_bad_input(minilm, tmp_path, tiny_cls_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Embedder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="texts is empty"):
        minilm.encode([])
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        minilm.encode(["fine", 3])
    with pytest.raises(TypeError, match="single string"):
        minilm.encode("not a list")
    assert np.isfinite(minilm.encode([""])).all()

    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        Embedder.from_pretrained(gpt)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_cls_checkpoint / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Embedder.from_pretrained(no_weights)


def test_missing_tensor_is_named(tiny_cls_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(tiny_cls_checkpoint / "model.safetensors")
    del tensors["encoder.layer.1.attention.self.key.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(tiny_cls_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.key.weight"):
        encoder.load_hf(tmp_path)


def test_bf16_close_to_fp32(minilm_dir, real_texts):
    texts = [t[:200] for t in real_texts[:8]]
    fp32 = Embedder.from_pretrained(minilm_dir).encode(texts)
    bf16 = Embedder.from_pretrained(minilm_dir, dtype="bfloat16").encode(texts)
    assert bf16.dtype == np.float32
    assert (fp32 * bf16).sum(1).min() > 0.99


def test_remat_does_not_change_gradients(tiny_cls_checkpoint):
    import jax
    import jax.numpy as jnp
    config, params, _ = encoder.load_hf(tiny_cls_checkpoint)
    ids = jnp.array([[101, 2054, 2003, 102, 0], [101, 7592, 102, 0, 0]])
    mask = (ids > 0).astype(jnp.int32)
    loss = lambda p, remat: encoder.embed(p, ids, mask, config=config, remat=remat).sum()
    plain = jax.grad(loss)(params, "none")
    for policy in ("full", "dots"):
        rematted = jax.grad(loss)(params, policy)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.skipif(__import__("jax").default_backend() != "gpu",
                    reason="cuDNN fused attention needs a GPU (run with JAX_PLATFORMS=cuda)")
def test_fused_attention_matches_xla_on_gpu(monkeypatch):
    import jax
    import jax.numpy as jnp
    config = encoder.EncoderConfig(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4,
                                   intermediate_size=512, pooling="mean")
    params = encoder.init_params(jax.random.PRNGKey(0), config)
    lengths = np.array([0, 1, 7, 33, 64, 128])  # an all-padding filler row included
    ids = np.random.default_rng(0).integers(1, 1000, (len(lengths), 128))
    mask = (np.arange(128)[None] < lengths[:, None]).astype(np.int32)
    ids = jnp.asarray(ids * mask)

    direction = jax.random.normal(jax.random.PRNGKey(1), (len(lengths) - 1, config.hidden_size))

    def embeddings_and_grads():
        embed = lambda p: encoder.embed(p, ids, mask, config=config, dtype=jnp.bfloat16)
        loss = lambda p: (embed(p)[1:] * direction).sum()
        return jax.jit(embed)(params), jax.jit(jax.grad(loss))(params)

    assert encoder.attention_impl(jnp.bfloat16, config.head_dim) == "cudnn"
    fused, fused_grads = embeddings_and_grads()
    monkeypatch.setattr(encoder, "attention_impl", lambda dtype, head_dim: "xla")
    xla, xla_grads = embeddings_and_grads()
    assert np.isfinite(np.asarray(fused)).all()
    np.testing.assert_allclose(np.asarray(fused)[1:], np.asarray(xla)[1:], atol=2e-2)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(xla_grads)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all()
        assert np.abs(a - b).max() <= 5e-2 * np.abs(b).max() + 1e-6
