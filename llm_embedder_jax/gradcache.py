"""Gradient caching (GradCache, Gao et al. 2021) as a function transform.

A contrastive loss couples every query with every key, so its batch cannot be
split into independent micro-batches. GradCache splits the encoder instead:

1. embed all queries and keys chunk by chunk with no gradient (only the
   embeddings are kept, never the activations);
2. differentiate the loss with respect to those embeddings (cheap: the
   embeddings are small);
3. re-run each chunk's forward under `jax.vjp` and pull its slice of the
   embedding gradient back into the parameters, accumulating over chunks.

Peak activation memory is one chunk's, for one extra forward pass, and the
result equals the plain `jax.value_and_grad` of the whole batch. That equality
needs a deterministic encoder: both forward passes must compute the same
embeddings, so the encoder runs without dropout in training (as the recipe
does) and no rng is threaded through.
"""
import jax
import jax.numpy as jnp


def value_and_grad(embed_fn, loss_fn, *, chunk_size, query_chunk_size=None):
    """`jax.value_and_grad` of loss_fn(embed(queries), embed(keys), *loss_args), computed in chunks.

    embed_fn(params, inputs) -> [n, d]: embeds a pytree of arrays that share a
      leading row axis (e.g. {"ids": [n, L], "mask": [n, L]}); it is used for
      queries and keys alike (tied encoder; close over anything static).
    loss_fn(q_emb, k_emb, *loss_args) -> scalar.
    chunk_size: global rows embedded at once for keys; query_chunk_size for
      queries (default chunk_size). Each must divide its side's rows; under
      data parallelism make it a multiple of the data-parallel device count, so
      every chunk spans all devices.

    Returns f(params, query_inputs, key_inputs, *loss_args) -> (loss, grads),
    jittable, with grads shaped like params (accumulated in at least float32,
    returned in each parameter's dtype).
    """
    query_chunk_size = chunk_size if query_chunk_size is None else query_chunk_size

    def cached_value_and_grad(params, query_inputs, key_inputs, *loss_args):
        query_chunks = _split(query_inputs, query_chunk_size, "query_inputs", "query_chunk_size")
        key_chunks = _split(key_inputs, chunk_size, "key_inputs", "chunk_size")

        # stop_gradient: were this function itself differentiated, nothing may flow through the no-grad pass
        frozen = jax.lax.stop_gradient(params)
        q_emb = _merge(jax.lax.map(lambda chunk: embed_fn(frozen, chunk), query_chunks))
        k_emb = _merge(jax.lax.map(lambda chunk: embed_fn(frozen, chunk), key_chunks))

        loss, (q_grad, k_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1))(q_emb, k_emb, *loss_args)

        def pull_back(grads, chunk_and_cotangent):
            chunk, cotangent = chunk_and_cotangent
            _, vjp = jax.vjp(lambda p: embed_fn(p, chunk), params)
            (chunk_grads,) = vjp(cotangent)
            return jax.tree.map(lambda total, g: total + g.astype(total.dtype), grads, chunk_grads), None

        grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
        grads, _ = jax.lax.scan(pull_back, grads, (query_chunks, _split_rows(q_grad, query_chunk_size)))
        grads, _ = jax.lax.scan(pull_back, grads, (key_chunks, _split_rows(k_grad, chunk_size)))
        return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    return cached_value_and_grad


def _split(inputs, chunk_size, name, field):
    """[n, ...] leaves -> [n / chunk_size, chunk_size, ...], checking the shapes first."""
    leaves = jax.tree_util.tree_leaves_with_path(inputs)
    if not leaves:
        raise ValueError(f"{name} has no arrays")
    rows = {jax.tree_util.keystr(path): leaf.shape[0] if leaf.ndim else None for path, leaf in leaves}
    if len(set(rows.values())) != 1 or None in rows.values():
        raise ValueError(f"{name}: every array needs the same leading row axis, got rows {rows}")
    n = next(iter(rows.values()))
    if chunk_size <= 0 or n % chunk_size:
        raise ValueError(f"{name} has {n} rows, which {field}={chunk_size} does not divide; "
                         f"choose a divisor of {n}")
    return jax.tree.map(lambda x: _split_rows(x, chunk_size), inputs)


def _split_rows(x, chunk_size):
    # Chunk c takes rows c, c + n_chunks, c + 2 n_chunks, ...: with the rows
    # sharded in contiguous blocks over devices, every chunk then spans every
    # device, and the scan over chunks stays data-parallel.
    n_chunks = x.shape[0] // chunk_size
    return jnp.swapaxes(x.reshape(chunk_size, n_chunks, *x.shape[1:]), 0, 1)


def _merge(chunked):
    """Inverse of _split_rows: [n_chunks, chunk_size, ...] -> [n, ...] in the original row order."""
    return jnp.swapaxes(chunked, 0, 1).reshape(-1, *chunked.shape[2:])
