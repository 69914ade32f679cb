#!/usr/bin/env python3
"""Training-step and encoding throughput of llm_embedder_jax, comparable with the PyTorch anchor.

Same arguments and JSON fields as `torch_anchor.py` (shared/bench): a query
batch, a group of keys per query, contrastive (weight 0.2) + graded
distillation, AdamW, bf16 compute on accelerators, random weights. The step
timed is the project's own `train.train_step`. Run both in the same call:

  python3 ../shared/bench/torch_anchor.py --size base --batch 64 --group 8 --qlen 64 --klen 256
  python3 bench/train_throughput.py        --size base --batch 64 --group 8 --qlen 64 --klen 256

Imports only jax, numpy, optax and the project's core.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from llm_embedder_jax import buckets, encoder, export, sharding, train  # noqa: E402

SIZES = {  # hidden, layers, heads, intermediate
    "small": (384, 12, 12, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12}  # dense bf16, SXM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="base", choices=SIZES)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--qlen", type=int, default=64)
    p.add_argument("--klen", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="accepted for parity with the anchor; always compiled")
    p.add_argument("--encode-batch", type=int, default=512)
    p.add_argument("--lengths", default=None, help="JSON of real token lengths (toy_lengths.json)")
    p.add_argument("--task", default="qa")
    p.add_argument("--gradcache-chunk", type=int, default=0, help="queries per GradCache chunk; 0 = off")
    p.add_argument("--remat", default="none", choices=list(encoder.REMAT_POLICIES))
    p.add_argument("--json", default=None)
    a = p.parse_args()

    device = jax.devices()[0]
    on_accelerator = device.platform != "cpu"
    h, l, nh, inter = SIZES[a.size]
    config = encoder.EncoderConfig(vocab_size=30522, hidden_size=h, num_layers=l, num_heads=nh,
                                   intermediate_size=inter, pooling="cls")
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    params = jax.device_put(encoder.init_params(jax.random.PRNGKey(0), config), replicated)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(5e-6, weight_decay=0.01))
    state = jax.jit(lambda p: train.init_state(p, tx), out_shardings=replicated)(params)
    dtype = "bfloat16" if on_accelerator else "float32"
    settings = train.StepSettings(
        model_config=config,
        loss=tuple(sorted(dict(loss="graded", temperature=0.02, reward_temperature=1.0, teacher_temperature=0.1,
                               student_temperature=1.0, pin_positive=False, contrastive_weight=0.2,
                               distill_weight=1.0).items())),
        dtype=dtype, remat=a.remat, gradcache_chunk=a.gradcache_chunk)
    rng = np.random.default_rng(0)

    def make_batch(n, lengths):
        ids = rng.integers(1000, 30000, (n, max(lengths)))
        return buckets.pad_batch([row[:n_] for row, n_ in zip(ids.tolist(), lengths)], max_length=512)

    if a.lengths:
        pools = json.load(open(a.lengths))["tasks"][a.task]
        draw = lambda n, pool: [int(x) for x in rng.choice(pool, n)]
        length_sets = [(draw(a.batch, pools["query"]), draw(a.batch * a.group, pools["key"])) for _ in range(4)]
    else:
        length_sets = [([a.qlen] * a.batch, [a.klen] * (a.batch * a.group))]
    teacher = -np.sort(-rng.standard_normal((a.batch, a.group)).astype(np.float32), axis=-1)
    batches = []
    for q_lengths, k_lengths in length_sets:
        (qi, qm), (ki, km) = make_batch(a.batch, q_lengths), make_batch(a.batch * a.group, k_lengths)
        batches.append(sharding.global_batch(mesh, {"query_ids": qi, "query_mask": qm, "key_ids": ki,
                                                    "key_mask": km, "teacher_scores": teacher}))
    tokens = sum(sum(q) + sum(k) for q, k in length_sets) / len(length_sets)

    def run(state, n):
        for i in range(n):
            state, metrics = train.train_step(state, batches[i % len(batches)], 0, settings=settings, tx=tx)
            metrics["loss"].block_until_ready()
        return state

    state = run(state, max(a.warmup, len(batches)))
    t0 = time.perf_counter()
    state = run(state, a.steps)
    dt = (time.perf_counter() - t0) / a.steps

    attn = 0 if a.lengths else 3 * 4 * l * h * (a.batch * a.qlen ** 2 + a.batch * a.group * a.klen ** 2)
    flops = 6 * n_params * tokens + attn
    name = getattr(device, "device_kind", device.platform)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    ids = jax.device_put(rng.integers(1000, 30000, (a.encode_batch, a.klen)).astype(np.int32),
                         sharding.data_sharded(mesh))
    mask = jnp.ones_like(ids)
    encode = lambda: export._embed(state["params"], ids, mask, config=config,
                                   dtype=export.DTYPES[dtype]).block_until_ready()
    for _ in range(3):
        encode()
    t1 = time.perf_counter()
    n_enc = 10
    for _ in range(n_enc):
        encode()
    enc_dt = (time.perf_counter() - t1) / n_enc

    stats = device.memory_stats() if on_accelerator else None
    res = {
        "impl": "llm_embedder_jax", "device": name, "size": a.size, "params": int(n_params),
        "batch": a.batch, "group": a.group, "qlen": a.qlen, "klen": a.klen,
        "lengths": a.task if a.lengths else None,
        "step_s": dt, "queries_per_s": a.batch / dt, "tokens_per_s": tokens / dt,
        "mfu": flops / dt / peak if peak else None,
        "encode_passages_per_s": a.encode_batch / enc_dt,
        "peak_mem_gib": stats["peak_bytes_in_use"] / 2 ** 30 if stats else None,
        "jax": jax.__version__, "gradcache_chunk": a.gradcache_chunk, "remat": a.remat,
    }
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
