#!/usr/bin/env python3
"""Reward LLM throughput: answer scoring and KV-cached sampling, against the PyTorch anchor.

Same arguments and JSON fields as `../shared/bench/torch_reward_anchor.py`
("impl" instead of "anchor"), so a ratio is one division. Random weights
(bfloat16 on GPU, float32 on CPU); speed does not depend on their values.
Imports only jax, numpy and the core of this package.

  python3 ../shared/bench/torch_reward_anchor.py --size 7b --batch 16 --seqlen 512
  python3 bench/reward_throughput.py             --size 7b --batch 16 --seqlen 512

Scoring is one jitted forward that sends only the `answer` positions through
the output head. Sampling is one jitted call: a fused prefill (cuDNN flash
attention on GPU), then a `lax.while_loop` that decodes into a preallocated KV
cache updated in place (the cache never leaves the call, so there is nothing
to copy or donate between steps). `gen_decode_new_tokens_per_s` separates the
decode rate from the prefill.
"""
import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from llm_embedder_jax import llm  # noqa: E402

SIZES = {  # hidden, layers, heads, kv_heads, intermediate, vocab (as the anchor)
    "135m": (576, 30, 9, 3, 1536, 49152),     # SmolLM2-135M
    "1b": (2048, 16, 32, 8, 8192, 128256),    # Llama-3.2-1B
    "7b": (4096, 32, 32, 32, 11008, 32000),   # Llama-2-7B
}


def timed(fn, *, warmup, repeats):
    for _ in range(warmup):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="7b", choices=SIZES)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--answer", type=int, default=32, help="answer tokens scored at the end")
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--gen-prompt", type=int, default=256)
    p.add_argument("--gen-new", type=int, default=32)
    p.add_argument("--attention", default=None, choices=("cudnn", "xla"),
                   help="attention of the prefill/scoring forward (default: cudnn on GPU, xla elsewhere)")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    gpu = jax.default_backend() == "gpu"
    hidden, layers, heads, kv_heads, intermediate, vocab = SIZES[a.size]
    # transformers.LlamaConfig defaults, as the anchor builds its model: untied head, eps 1e-6, theta 1e4.
    config = llm.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate,
                             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                             max_position_embeddings=max(a.seqlen, a.gen_prompt + a.gen_new))
    dtype = jnp.bfloat16 if gpu else jnp.float32
    attention_impl = a.attention or ("cudnn" if gpu else "xla")
    params = jax.jit(functools.partial(llm.init_params, config=config, dtype=dtype))(jax.random.key(0))
    rng = np.random.default_rng(0)

    score = jax.jit(functools.partial(llm.answer_logprob, config=config, answer_width=a.answer,
                                      attention_impl=attention_impl))
    ids = jnp.asarray(rng.integers(100, vocab - 1, (a.batch, a.seqlen)), jnp.int32)
    lengths = jnp.full((a.batch,), a.seqlen, jnp.int32)
    answers = jnp.full((a.batch,), a.answer, jnp.int32)
    score_dt = timed(lambda: score(params, ids, lengths, answers), warmup=2, repeats=5)

    gen_ids = jnp.asarray(rng.integers(100, vocab - 1, (a.gen_batch, a.gen_prompt)), jnp.int32)
    gen_lengths = jnp.full((a.gen_batch,), a.gen_prompt, jnp.int32)
    prompt_index = jnp.arange(a.gen_batch, dtype=jnp.int32)

    def sampler(new_tokens):
        # No EOS: every row decodes all `new_tokens`, like the anchor's min_new_tokens.
        generate = jax.jit(functools.partial(
            llm.generate, config=config, num_samples=1, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
            eos_ids=(), attention_impl=attention_impl))
        return lambda: generate(params, gen_ids, gen_lengths, prompt_index, jnp.uint32(0))

    gen_dt = timed(sampler(a.gen_new), warmup=1, repeats=1)
    prefill_dt = timed(sampler(1), warmup=1, repeats=1)  # the prefill and one token

    stats = jax.devices()[0].memory_stats() if gpu else None
    res = {
        "impl": "llm_embedder_jax", "device": jax.devices()[0].device_kind if gpu else "cpu",
        "size": a.size, "params": sum(x.size for x in jax.tree.leaves(params)),
        "score_batch": a.batch, "seqlen": a.seqlen,
        "score_sequences_per_s": a.batch / score_dt,
        "score_tokens_per_s": a.batch * a.seqlen / score_dt,
        "gen_batch": a.gen_batch, "gen_prompt": a.gen_prompt, "gen_new": a.gen_new,
        "gen_new_tokens_per_s": a.gen_batch * a.gen_new / gen_dt,
        "gen_decode_new_tokens_per_s": a.gen_batch * (a.gen_new - 1) / max(gen_dt - prefill_dt, 1e-9),
        "peak_mem_gib": stats["peak_bytes_in_use"] / 2**30 if stats else None,
        "attention": attention_impl, "jax": jax.__version__,
    }
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
