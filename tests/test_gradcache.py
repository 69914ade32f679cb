"""GradCache gives the uncached loss and gradient, for an MLP and for the real encoder, sharded or not."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_embedder_jax import encoder, gradcache, losses, sharding

BATCH, GROUP = 8, 4
SETTINGS = {
    "loss": "graded", "temperature": 0.05, "contrastive_weight": 0.2, "distill_weight": 1.0,
    "reward_temperature": 1.0, "pin_positive": True,
}


def loss_fn(q, k, teacher):
    return losses.task_loss(q, k, teacher, settings=SETTINGS)


def mlp_params(seed, d_in=10, hidden=16, d_out=6):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(d_in, hidden)) / np.sqrt(d_in), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(hidden,)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(hidden, d_out)) / np.sqrt(hidden), jnp.float32),
    }


def mlp_embed(params, inputs):
    h = jnp.tanh((inputs["x"] * inputs["mask"]) @ params["w1"] + params["b1"])
    return encoder.normalize(h @ params["w2"])


def mlp_inputs(seed, rows, d_in=10):
    rng = np.random.default_rng(seed)
    mask = (rng.random((rows, d_in)) < 0.8).astype(np.float32)
    return {"x": rng.normal(size=(rows, d_in)).astype(np.float32), "mask": mask}


def teacher_scores(seed):
    return np.random.default_rng(seed).normal(size=(BATCH, GROUP)).astype(np.float32)


def uncached(embed_fn, params, query_inputs, key_inputs, teacher):
    whole_batch_loss = lambda p, qi, ki, t: loss_fn(embed_fn(p, qi), embed_fn(p, ki), t)
    return jax.jit(jax.value_and_grad(whole_batch_loss))(params, query_inputs, key_inputs, teacher)


def assert_same(cached, reference, atol=1e-5):
    (loss, grads), (ref_loss, ref_grads) = cached, reference
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    errors = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), grads, ref_grads)
    scale = max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(ref_grads))
    assert scale > 1e-3, "the gradient must be non-trivial for the comparison to mean anything"
    assert max(jax.tree.leaves(errors)) < atol, errors


def test_mlp_gradients_equal_uncached_and_chunks_are_small():
    params = mlp_params(0)
    query_inputs, key_inputs, teacher = mlp_inputs(1, BATCH), mlp_inputs(2, BATCH * GROUP), teacher_scores(3)
    seen_rows = []

    def recording_embed(p, inputs):
        seen_rows.append(inputs["x"].shape[0])
        return mlp_embed(p, inputs)

    cached = jax.jit(gradcache.value_and_grad(recording_embed, loss_fn, chunk_size=8, query_chunk_size=4))
    assert_same(cached(params, query_inputs, key_inputs, teacher),
                uncached(mlp_embed, params, query_inputs, key_inputs, teacher))
    # the encoder only ever sees one chunk: the no-grad pass and the VJP pass, queries and keys
    assert set(seen_rows) == {4, 8}


def test_encoder_gradients_equal_uncached():
    config = encoder.EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                   intermediate_size=48, max_position_embeddings=16)
    params = jax.jit(encoder.init_params, static_argnums=1)(jax.random.key(0), config)
    rng = np.random.default_rng(4)

    def token_inputs(rows, length):
        lengths = rng.integers(2, length + 1, size=rows)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        return {"ids": rng.integers(1, 64, size=(rows, length)).astype(np.int32) * mask, "mask": mask}

    embed = lambda p, inputs: encoder.embed(p, inputs["ids"], inputs["mask"], config=config)
    query_inputs, key_inputs, teacher = token_inputs(BATCH, 6), token_inputs(BATCH * GROUP, 12), teacher_scores(5)
    cached = jax.jit(gradcache.value_and_grad(embed, loss_fn, chunk_size=16, query_chunk_size=4))
    assert_same(cached(params, query_inputs, key_inputs, teacher),
                uncached(embed, params, query_inputs, key_inputs, teacher))


def test_sharded_over_eight_devices_equals_uncached():
    mesh = sharding.make_mesh()
    assert mesh.shape["data"] == 8
    put = functools.partial(jax.device_put, device=sharding.data_sharded(mesh))
    params = jax.device_put(mlp_params(6), sharding.replicated(mesh))
    query_inputs, key_inputs, teacher = mlp_inputs(7, BATCH), mlp_inputs(8, BATCH * GROUP), teacher_scores(9)
    cached = jax.jit(gradcache.value_and_grad(mlp_embed, loss_fn, chunk_size=16, query_chunk_size=8),
                     out_shardings=sharding.replicated(mesh))
    result = cached(params, jax.tree.map(put, query_inputs), jax.tree.map(put, key_inputs), put(teacher))
    assert_same(result, uncached(mlp_embed, mlp_params(6), query_inputs, key_inputs, teacher))


def test_bad_row_counts_are_reported():
    params, teacher = mlp_params(0), teacher_scores(0)
    cached = gradcache.value_and_grad(mlp_embed, loss_fn, chunk_size=5, query_chunk_size=4)
    with pytest.raises(ValueError, match=r"key_inputs has 32 rows, which chunk_size=5 does not divide"):
        cached(params, mlp_inputs(0, BATCH), mlp_inputs(1, BATCH * GROUP), teacher)
    ragged = dict(mlp_inputs(1, BATCH * GROUP), mask=np.ones((BATCH * GROUP - 1, 10), np.float32))
    cached = gradcache.value_and_grad(mlp_embed, loss_fn, chunk_size=8)
    with pytest.raises(ValueError, match="same leading row axis"):
        cached(params, mlp_inputs(0, BATCH), ragged, teacher)
