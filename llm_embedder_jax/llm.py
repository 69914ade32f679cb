"""Llama-family causal LM as pure functions, checkpoint loading, and `RewardLM`.

Covers Llama-2/3 (incl. Llama-3.1 rope scaling), SmolLM2 and Qwen2 (q/k/v
biases): RMSNorm, rotary embeddings with the checkpoint's theta, grouped-query
attention, SwiGLU, tied or untied output head.

Parameters are a plain nested dict; layers are stacked on a leading axis so
that one `lax.scan` runs them all (one compiled layer, quick compiles):

    {"embed": [V, D], "final_norm": [D], "lm_head": [V, D] (untied heads only),
     "layers": {"attn_norm": [L, D], "q": [L, D, H*hd], "k", "v": [L, D, K*hd],
                "q_bias": [L, H*hd], "k_bias", "v_bias": [L, K*hd] (Qwen2 only),
                "o": [L, H*hd, D], "mlp_norm": [L, D],
                "gate", "up": [L, D, F], "down": [L, F, D]}}

Projection matrices are stored (in, out), so a projection is `x @ W`.
Batches are right-padded: row b holds `lengths[b]` real tokens, then padding.
Compute runs in the dtype of the parameters (float32 or bfloat16); norms,
softmax and log-probabilities in float32.
"""
import dataclasses
import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_embedder_jax import buckets, encoder, safetensors_io
from llm_embedder_jax import sharding as sharding_lib

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Per-frequency divisors of the rotary inverse frequencies (linear / Llama-3.1 scaling); None = unscaled.
    rope_divisors: tuple | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    max_position_embeddings: int = 4096


def _rope_divisors(rope, *, head_dim, theta, where):
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return (float(rope["factor"]),) * (head_dim // 2)
    if kind == "llama3":
        # transformers' `_compute_llama3_parameters`, expressed as divisors of the base frequencies.
        inv_freq = _base_inv_freq(theta, head_dim)
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_context = rope["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        scaled = np.where(medium, smoothed, scaled)
        return tuple(float(d) for d in inv_freq / scaled)
    raise ValueError(f"{where}: rope type {kind!r} is not supported (default, linear, llama3)")


def config_from_hf(hf, *, where="config.json"):
    """`LlamaConfig` from a Hugging Face config.json dict; `where` names the file in errors."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: field 'model_type' is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(Llama-2/3, SmolLM2, Qwen2)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: field 'hidden_act' is {hf['hidden_act']!r}; only 'silu' is supported")
    if hf.get("mlp_bias") or hf.get("use_sliding_window"):
        raise ValueError(f"{where}: 'mlp_bias' / 'use_sliding_window' are not supported")
    try:
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = dict(hf.get("rope_scaling") or {})
        rope.update(hf.get("rope_parameters") or {})  # transformers >= 5 keeps theta and scaling here
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        return LlamaConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_divisors=_rope_divisors(rope, head_dim=head_dim, theta=theta, where=where),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
        )
    except KeyError as e:
        raise ValueError(f"{where}: required field {e.args[0]!r} is missing") from None


# ----------------------------------------------------------------------------- parameters

def params_from_torch_layout(weights, *, dtype):
    """Per-layer PyTorch-layout arrays -> our pytree (matrices transposed to (in, out), layers stacked).

    `weights`: {"embed": [V, D], "final_norm": [D], "lm_head": [V, D] (optional),
    "layers": {name: [array per layer]}}, matrices (out, in) as in PyTorch.
    """
    dtype = np.dtype(jnp.dtype(dtype))
    layers = {}
    for name, per_layer in weights["layers"].items():
        layers[name] = np.stack([w.T if w.ndim == 2 else w for w in per_layer]).astype(dtype)
    params = {key: np.asarray(value).astype(dtype) for key, value in weights.items() if key != "layers"}
    params["layers"] = layers
    return params


def assemble_params(tensors, *, config, dtype, where, embed, final_norm, lm_head, layer_key, layer_names):
    """Pops a checkpoint's tensors (PyTorch layout, checkpoint names) into our pytree.

    `layer_names` maps a checkpoint's per-layer name to ours; `layer_key` formats
    (i, name) into the full tensor name. A missing or left-over tensor is an error.
    """
    def take(name):
        if name not in tensors:
            raise ValueError(f"{where}: weight {name!r} is missing")
        return tensors.pop(name)

    present = [n for n in layer_names if layer_key.format(i=0, name=n) in tensors]
    weights = {
        "embed": take(embed),
        "final_norm": take(final_norm),
        "layers": {layer_names[n]: [take(layer_key.format(i=i, name=n)) for i in range(config.num_layers)]
                   for n in present},
    }
    if config.tie_word_embeddings:
        tensors.pop(lm_head, None)  # some tied checkpoints store the shared matrix twice
    else:
        weights["lm_head"] = take(lm_head)
    if tensors:
        raise ValueError(f"{where}: unexpected weights {sorted(tensors)[:5]} (of {len(tensors)})")
    return params_from_torch_layout(weights, dtype=dtype)


def init_params(key, *, config, dtype="float32"):
    """Random weights (normal, std 0.02; unit norms) of the shapes a checkpoint of `config` loads to."""
    c, L = config, config.num_layers
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"q": (L, c.hidden_size, q_out), "k": (L, c.hidden_size, kv_out), "v": (L, c.hidden_size, kv_out),
              "o": (L, q_out, c.hidden_size), "gate": (L, c.hidden_size, c.intermediate_size),
              "up": (L, c.hidden_size, c.intermediate_size), "down": (L, c.intermediate_size, c.hidden_size)}
    keys = jax.random.split(key, len(shapes) + 2)
    normal = lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    layers = {name: normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}
    layers["attn_norm"] = layers["mlp_norm"] = jnp.ones((L, c.hidden_size), dtype)
    if c.attention_bias:
        layers.update(q_bias=jnp.zeros((L, q_out), dtype), k_bias=jnp.zeros((L, kv_out), dtype),
                      v_bias=jnp.zeros((L, kv_out), dtype))
    params = {"embed": normal(keys[-1], (c.vocab_size, c.hidden_size)),
              "final_norm": jnp.ones((c.hidden_size,), dtype), "layers": layers}
    if not c.tie_word_embeddings:
        params["lm_head"] = normal(keys[-2], (c.vocab_size, c.hidden_size))
    return params


# ----------------------------------------------------------------------------- model

def _rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _base_inv_freq(theta, head_dim):
    # float32 like transformers, so that long positions rotate identically.
    return (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))


def _rope(x, positions, config):
    """Rotary embedding, half-split layout; x [B, S, N, hd], positions [B, S]."""
    inv_freq = _base_inv_freq(config.rope_theta, config.head_dim)
    if config.rope_divisors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_divisors, np.float32)
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _project_qkv(layer, h, positions, config):
    batch, seq, _ = h.shape

    def project(name, heads):
        y = h @ layer[name]
        if config.attention_bias:
            y = y + layer[name + "_bias"]
        return y.reshape(batch, seq, heads, config.head_dim)

    q = _rope(project("q", config.num_heads), positions, config)
    k = _rope(project("k", config.num_kv_heads), positions, config)
    return q, k, project("v", config.num_kv_heads)


def _mlp(layer, x, config):
    h = _rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    return (jax.nn.silu(h @ layer["gate"]) * (h @ layer["up"])) @ layer["down"]


def hidden_states(params, ids, lengths, *, config, attention_impl="xla", return_kv=False):
    """Final-norm hidden states [B, S, D] of right-padded `ids` [B, S] with `lengths` [B].

    With `return_kv`, also the rotated keys and the values of every layer,
    each [L, B, S, K, hd]: the prefill of a KV cache.
    `attention_impl` goes to `jax.nn.dot_product_attention` ("xla" or "cudnn").
    """
    batch, seq = ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    lengths = lengths.astype(jnp.int32)

    def layer_step(x, layer):
        h = _rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(layer, h, positions, config)
        attended = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation=attention_impl)
        x = x + attended.reshape(batch, seq, -1) @ layer["o"]
        x = x + _mlp(layer, x, config)
        return x, ((k, v) if return_kv else None)

    x, kv = lax.scan(layer_step, params["embed"][ids], params["layers"])
    x = _rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return (x, kv) if return_kv else x


def _logits(params, h, config):
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", h, head, preferred_element_type=jnp.float32)


def _target_logprobs(params, h, targets, config):
    """log p(targets | h) in float32; h [..., D], targets [...]."""
    logits = _logits(params, h, config)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def forward(params, ids, mask, *, config, attention_impl="xla"):
    """float32 logits [B, S, V] of right-padded `ids` [B, S] (`mask` [B, S]: ones, then zeros)."""
    h = hidden_states(params, ids, mask.sum(-1), config=config, attention_impl=attention_impl)
    return _logits(params, h, config)


def token_logprobs(params, ids, mask, *, config, attention_impl="xla"):
    """log p(ids[:, t] | ids[:, :t]) for t >= 1: float32 [B, S - 1], zero at padding."""
    h = hidden_states(params, ids, mask.sum(-1), config=config, attention_impl=attention_impl)
    logprobs = _target_logprobs(params, h[:, :-1], ids[:, 1:], config)
    return jnp.where(mask[:, 1:] > 0, logprobs, 0.0)


def answer_logprob(params, ids, lengths, answer_lengths, *, config, answer_width, attention_impl="xla"):
    """Mean log-probability of each row's last `answer_lengths[b]` real tokens: float32 [B].

    Only the `answer_width` (>= max answer length) positions that predict
    answer tokens go through the output head, not the whole prompt.
    """
    h = hidden_states(params, ids, lengths, config=config, attention_impl=attention_impl)
    offsets = jnp.arange(answer_width)
    predicting = (lengths - answer_lengths - 1)[:, None] + offsets  # the position before each answer token
    valid = offsets < answer_lengths[:, None]
    predicting = jnp.clip(predicting, 0, ids.shape[1] - 2)
    h_answer = jnp.take_along_axis(h, predicting[..., None], axis=1)
    targets = jnp.take_along_axis(ids, predicting + 1, axis=1)
    logprobs = jnp.where(valid, _target_logprobs(params, h_answer, targets, config), 0.0)
    return logprobs.sum(-1) / jnp.maximum(answer_lengths, 1)


def shared_prompt_answer_logprob(params, prompt_ids, prompt_lengths, answer_ids, answer_lengths, answer_prompt,
                                 *, config, attention_impl="xla"):
    """`answer_logprob` for many answers per prompt, running each prompt once: float32 [R].

    prompt_ids [G, S] right-padded prompts; answer_ids [R, W] right-padded
    answers, row r continuing prompt `answer_prompt[r]`. The prompts' keys and
    values are reused by all their answers, which then cost only their own
    tokens (the rank-aware reward scores N + 1 answers under every prompt).
    """
    hidden, (prompt_keys, prompt_values) = hidden_states(
        params, prompt_ids, prompt_lengths, config=config, attention_impl=attention_impl, return_kv=True)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    rows, width = answer_ids.shape
    starts = prompt_lengths[answer_prompt]
    positions = starts[:, None] + jnp.arange(width)
    sees_prompt = jnp.arange(prompt_ids.shape[1])[None, None, :] < starts[:, None, None]
    sees_answer = jnp.tril(jnp.ones((width, width), bool))[None]
    mask = jnp.concatenate([jnp.broadcast_to(sees_prompt, (rows, width, prompt_ids.shape[1])),
                            jnp.broadcast_to(sees_answer, (rows, width, width))], axis=-1)[:, None]

    def layer_step(x, layer_and_prompt_kv):
        layer, keys, values = layer_and_prompt_kv
        h = _rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(layer, h, positions, config)
        k = jnp.concatenate([keys[answer_prompt], k], axis=1)
        v = jnp.concatenate([values[answer_prompt], v], axis=1)
        attended = jax.nn.dot_product_attention(q, k, v, mask=mask)
        x = x + attended.reshape(rows, width, -1) @ layer["o"]
        return x + _mlp(layer, x, config), None

    x, _ = lax.scan(layer_step, params["embed"][answer_ids], (params["layers"], prompt_keys, prompt_values))
    h = _rms_norm(x, params["final_norm"], config.rms_norm_eps)
    # The prompt's last position predicts the first answer token; answer position t predicts t + 1.
    predicting = jnp.concatenate([last[answer_prompt][:, None], h[:, :-1]], axis=1)
    valid = jnp.arange(width)[None, :] < answer_lengths[:, None]
    logprobs = jnp.where(valid, _target_logprobs(params, predicting, answer_ids, config), 0.0)
    return logprobs.sum(-1) / jnp.maximum(answer_lengths, 1)


# ----------------------------------------------------------------------------- decoding

def _cached_attention(q, cache_k, cache_v, positions, config):
    """One query token per row against its cache; q [R, H, hd], cache [R, K, T, hd].

    Rows and KV heads lead the cache so that both einsums are plain batched
    matrix products over them, with no transposed copy of the cache per step.
    """
    rows, slots = cache_k.shape[0], cache_k.shape[2]
    groups = config.num_heads // config.num_kv_heads
    q = q.reshape(rows, config.num_kv_heads, groups, config.head_dim)
    scores = jnp.einsum("rkgd,rktd->rkgt", q, cache_k, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(config.head_dim)
    visible = jnp.arange(slots)[None, :] <= positions[:, None]
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(cache_v.dtype)
    return jnp.einsum("rkgt,rktd->rkgd", weights, cache_v).reshape(rows, 1, -1)


def _decode_step(params, tokens, positions, cache, *, config):
    """Run `tokens` [R] at `positions` [R] through the model, writing their keys/values into `cache`."""
    rows = jnp.arange(tokens.shape[0])

    def layer_step(carry, layer_and_index):
        x, (cache_k, cache_v) = carry
        layer, index = layer_and_index
        h = _rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(layer, h, positions[:, None], config)
        # Only the new token's slot is written: the cache stays in place inside the loop.
        cache_k = cache_k.at[index, rows, :, positions].set(k[:, 0])
        cache_v = cache_v.at[index, rows, :, positions].set(v[:, 0])
        x = x + _cached_attention(q[:, 0], cache_k[index], cache_v[index], positions, config) @ layer["o"]
        x = x + _mlp(layer, x, config)
        return (x, (cache_k, cache_v)), None

    x = params["embed"][tokens][:, None, :]
    layer_index = jnp.arange(config.num_layers)
    (x, cache), _ = lax.scan(layer_step, (x, cache), (params["layers"], layer_index))
    h = _rms_norm(x[:, 0], params["final_norm"], config.rms_norm_eps)
    return _logits(params, h, config), cache


def _top_p_filter(logits, top_p):
    """Keep the smallest set of most likely tokens whose probability reaches `top_p`."""
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    threshold = jnp.min(jnp.where(before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, jnp.finfo(jnp.float32).min)


def _choose(logits, row_keys, step, *, temperature, top_p):
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        logits = _top_p_filter(logits, top_p)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


def _row_keys(seed, prompt_index, num_samples):
    """One key per (prompt, sample): draws do not depend on batching, padding or the mesh."""
    per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), prompt_index)
    per_sample = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, jnp.arange(num_samples)))
    return per_sample(per_prompt).reshape(-1)


def generate(params, ids, lengths, prompt_index, seed, *, config, num_samples, max_new_tokens,
             temperature=1.0, top_p=1.0, eos_ids=(), attention_impl="xla"):
    """KV-cached sampling: int32 tokens [P * num_samples, max_new_tokens], rows prompt-major.

    ids [P, S] right-padded prompts with `lengths` [P]; `prompt_index` [P] and
    `seed` pick the random stream of each row. One prefill per prompt is shared
    by its samples; then a `lax.while_loop` decodes one token per step into a
    preallocated cache, until `max_new_tokens` or every row has emitted one of
    `eos_ids` (later slots hold `eos_ids[0]`). temperature == 0 is greedy.
    """
    hidden, (keys, values) = hidden_states(
        params, ids, lengths, config=config, attention_impl=attention_impl, return_kv=True)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = jnp.repeat(_logits(params, last, config), num_samples, axis=0)
    positions = jnp.repeat(lengths.astype(jnp.int32), num_samples)  # where the first new token goes
    grow = ((0, 0), (0, 0), (0, 0), (0, max_new_tokens), (0, 0))
    cache = tuple(jnp.pad(jnp.repeat(c, num_samples, axis=1).swapaxes(2, 3), grow)  # [L, R, K, T, hd]
                  for c in (keys, values))
    row_keys = _row_keys(seed, prompt_index, num_samples)
    choose = functools.partial(_choose, temperature=temperature, top_p=top_p)
    fill = eos_ids[0] if eos_ids else 0

    def is_eos(tokens):
        return functools.reduce(jnp.logical_or, [tokens == e for e in eos_ids], jnp.zeros(tokens.shape, bool))

    first = choose(logits, row_keys, 0)
    tokens = jnp.full((first.shape[0], max_new_tokens), fill, jnp.int32).at[:, 0].set(first)

    def unfinished(state):
        step, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(state):
        step, tokens, cache, done = state
        logits, cache = _decode_step(params, tokens[:, step - 1], positions + step - 1, cache, config=config)
        new = jnp.where(done, fill, choose(logits, row_keys, step))
        return step + 1, tokens.at[:, step].set(new), cache, done | is_eos(new)

    _, tokens, _, _ = lax.while_loop(unfinished, decode, (jnp.int32(1), tokens, cache, is_eos(first)))
    return tokens


# ----------------------------------------------------------------------------- sharding

# Tensor-parallel layout over the mesh axis "model", first match wins. Column-parallel
# q/k/v/gate/up and row-parallel o/down keep each layer to one all-reduce after
# attention and one after the MLP; embeddings and the output head split the vocabulary.
PARTITION_RULES = (
    (r"^(embed|lm_head)$", P("model", None)),
    (r"^layers/(q|k|v|gate|up)$", P(None, None, "model")),
    (r"^layers/(q|k|v)_bias$", P(None, "model")),
    (r"^layers/(o|down)$", P(None, "model", None)),
    (r"norm$", P()),
)


def _fit(spec, shape, mesh):
    # A dimension the axis does not divide stays replicated (e.g. a vocabulary of 49,153 rows
    # over 2 devices): the results are the same, only the memory saving is lost.
    return P(*(axis if axis is None or shape[i] % mesh.shape[axis] == 0 else None for i, axis in enumerate(spec)))


def param_shardings(params, mesh, rules=PARTITION_RULES):
    """A pytree of `NamedSharding` for `params` from (regex on "a/b" path, PartitionSpec) rules."""
    def pick(path, leaf):
        name = "/".join(str(k.key) for k in path)
        for pattern, spec in rules:
            if re.search(pattern, name):
                return NamedSharding(mesh, _fit(spec, leaf.shape, mesh))
        raise ValueError(f"no partition rule matches the parameter {name!r}")
    return jax.tree_util.tree_map_with_path(pick, params)


def place_params(params, mesh=None):
    """Host parameters -> device arrays, tensor-parallel over `mesh` when given."""
    if mesh is None:
        return jax.device_put(params)
    return jax.device_put(params, param_shardings(params, mesh))


# ----------------------------------------------------------------------------- checkpoints

# transformers name inside model.layers.{i}. -> our layer parameter name.
HF_LAYER_WEIGHTS = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o", "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}
def _hf_tensors(folder):
    return {key.removeprefix("model."): array for key, array in safetensors_io.read_folder(folder).items()}


def load_hf_folder(folder, *, dtype="float32"):
    """(config, params as numpy) of a Hugging Face folder: config.json + (sharded) safetensors."""
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder or a .gguf file)")
    config = config_from_hf(json.loads(config_path.read_text()), where=str(config_path))
    tensors = _hf_tensors(folder)

    return config, assemble_params(tensors, config=config, dtype=dtype, where=folder, embed="embed_tokens.weight",
                                   final_norm="norm.weight", lm_head="lm_head.weight",
                                   layer_key="layers.{i}.{name}", layer_names=HF_LAYER_WEIGHTS)


def load_params(path, *, dtype="float32"):
    """(config, host params) from a Hugging Face folder or a .gguf file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a Hugging Face model folder or a .gguf file")
        from llm_embedder_jax import gguf_io
        return gguf_io.load_gguf(path, dtype=dtype)
    return load_hf_folder(path, dtype=dtype)


def load_tokenizer(path):
    """The checkpoint's own tokenizer (transformers fast tokenizer), local files only."""
    from transformers import AutoTokenizer
    path = pathlib.Path(path)
    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json / tokenizer.model)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _eos_ids(tokenizer, folder=None):
    """EOS ids of the tokenizer plus those of generation_config.json (Llama-3 chat models list several)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    generation_config = pathlib.Path(folder or "") / "generation_config.json"
    if folder is not None and generation_config.exists():
        extra = json.loads(generation_config.read_text()).get("eos_token_id")
        ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
    return tuple(dict.fromkeys(ids))


# ----------------------------------------------------------------------------- public API

def _check_texts(texts, name):
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not a single {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is a {type(text).__name__}, not a str")
    return texts


def check_pairs(prompts, answers):
    """Both as lists of strings of one length (a (prompt, answer) pair each), or a clear error."""
    prompts, answers = _check_texts(prompts, "prompts"), _check_texts(answers, "answers")
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers; they must pair up")
    return prompts, answers


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _progress(iterable, total, desc):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=total < 8)


class RewardLM:
    """A causal LM that scores answers (`loglik`) and samples outputs (`sample`).

    The LLM whose feedback trains the embedder. Jitted, length-bucketed,
    batched; with a `mesh` the batch splits over "data" and the weights over
    "model" (`PARTITION_RULES`).
    """

    def __init__(self, *, params, config, tokenizer, mesh=None, eos_ids=None):
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.params = place_params(params, mesh)
        self.eos_ids = tuple(eos_ids) if eos_ids is not None else _eos_ids(tokenizer)
        self._data_size = mesh.shape["data"] if mesh is not None else 1
        dtype = jax.tree.leaves(self.params)[0].dtype
        # cuDNN flash attention also needs heads that are not split over "model".
        heads_whole = mesh is None or mesh.shape["model"] == 1
        impl = encoder.attention_impl(dtype, config.head_dim) if heads_whole else "xla"
        out = None if mesh is None else sharding_lib.replicated(mesh)
        self._score = jax.jit(
            functools.partial(answer_logprob, config=config, attention_impl=impl),
            static_argnames=("answer_width",), out_shardings=out)
        self._score_shared = jax.jit(
            functools.partial(shared_prompt_answer_logprob, config=config, attention_impl=impl), out_shardings=out)
        self._generate = jax.jit(
            functools.partial(generate, config=config, attention_impl=impl),
            static_argnames=("num_samples", "max_new_tokens", "temperature", "top_p", "eos_ids"),
            out_shardings=out)

    @classmethod
    def from_pretrained(cls, path, *, dtype="float32", mesh=None):
        """Load a Hugging Face folder (config.json + safetensors + tokenizer) or a .gguf file."""
        config, params = load_params(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
        folder = pathlib.Path(path) if pathlib.Path(path).is_dir() else None
        return cls(params=params, config=config, tokenizer=tokenizer, mesh=mesh,
                   eos_ids=_eos_ids(tokenizer, folder))

    def _put(self, *arrays):
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(jax.device_put(a, sharding_lib.data_sharded(self.mesh)) for a in arrays)

    def _prompt_ids(self, prompts):
        """Prompts with the tokenizer's own special tokens, minus a trailing EOS."""
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
        return [row[:-1] if row and row[-1] == eos else row for row in ids]

    def loglik(self, prompts, answers, *, batch_size=16, max_length=None):
        """Mean log-probability of each answer's tokens given its prompt: float32 [n].

        The prompt is tokenised with the tokenizer's special tokens (trailing EOS
        removed), the answer without any, and the two are concatenated. When the
        pair is longer than `max_length` (default: the model's context), the
        prompt is truncated from the left; the answer is always scored whole.
        Pairs that share a prompt run it once and score their answers from its
        KV cache (same results, a fraction of the compute).
        """
        prompts, answers = check_pairs(prompts, answers)
        max_length = max_length or self.config.max_position_embeddings
        prompt_ids = self._prompt_ids(prompts)
        answer_ids = self.tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
        kept_prompts = []
        for i, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids)):
            if not answer:
                raise ValueError(f"answers[{i}] is empty (no tokens): nothing to score")
            if len(answer) >= max_length:
                raise ValueError(f"answers[{i}] has {len(answer)} tokens, max_length={max_length} leaves no prompt")
            prompt = prompt[max(0, len(prompt) + len(answer) - max_length):]
            if not prompt:
                raise ValueError(f"prompts[{i}] is empty (no tokens): the first answer token needs a context")
            kept_prompts.append(tuple(prompt))
        by_prompt = {}
        for i, prompt in enumerate(kept_prompts):
            by_prompt.setdefault(prompt, []).append(i)
        rows = _round_up(max(1, min(batch_size, len(prompts))), self._data_size)
        scores = np.zeros(len(prompts), np.float32)
        alone = [group[0] for group in by_prompt.values() if len(group) == 1]
        self._score_alone(alone, kept_prompts, answer_ids, scores, rows=rows, max_length=max_length)
        shared = [group for group in by_prompt.values() if len(group) > 1]
        self._score_shared_prompts(shared, kept_prompts, answer_ids, scores, rows=rows, max_length=max_length)
        return scores

    def _score_alone(self, indices, prompts, answers, scores, *, rows, max_length):
        """Pairs whose prompt is not repeated: one right-padded sequence each."""
        sequences = [list(prompts[i]) + answers[i] for i in indices]
        batches = buckets.length_sorted_batches([len(s) for s in sequences], rows)
        for batch in _progress(batches, len(batches), "loglik"):
            ids, mask = buckets.pad_batch([sequences[b] for b in batch], max_length=max_length, rows=rows)
            lengths = np.maximum(mask.sum(1), 1).astype(np.int32)  # empty padding rows: never a fully masked row
            answer_lengths = np.zeros(rows, np.int32)
            answer_lengths[:len(batch)] = [len(answers[indices[b]]) for b in batch]
            width = buckets.bucket_length(int(answer_lengths.max()), max_length=max_length)
            result = self._score(self.params, *self._put(ids, lengths, answer_lengths), answer_width=width)
            scores[[indices[b] for b in batch]] = np.asarray(result)[:len(batch)]  # waits: no pile-up of collectives

    def _score_shared_prompts(self, groups, prompts, answers, scores, *, rows, max_length):
        """Groups of pairs with one prompt: the prompt runs once, its answers continue from its cache."""
        units = [group[k:k + rows] for group in groups for k in range(0, len(group), rows)]
        units.sort(key=lambda unit: -len(prompts[unit[0]]))
        batches = []
        for unit in units:  # pack whole units, at most `rows` answers per batch
            if not batches or sum(map(len, batches[-1])) + len(unit) > rows:
                batches.append([])
            batches[-1].append(unit)
        for batch in _progress(batches, len(batches), "loglik (shared prompts)"):
            # Prompt rows: a power of two, so that few shapes compile.
            prompt_rows = _round_up(1 << (len(batch) - 1).bit_length(), self._data_size)
            prompt_ids, prompt_mask = buckets.pad_batch([list(prompts[unit[0]]) for unit in batch],
                                                        max_length=max_length, rows=prompt_rows)
            members = [i for unit in batch for i in unit]
            answer_ids, answer_mask = buckets.pad_batch([answers[i] for i in members], max_length=max_length, rows=rows)
            answer_prompt = np.zeros(rows, np.int32)
            answer_prompt[:len(members)] = [g for g, unit in enumerate(batch) for _ in unit]
            result = self._score_shared(
                self.params, *self._put(prompt_ids, np.maximum(prompt_mask.sum(1), 1).astype(np.int32)),
                *self._put(answer_ids, answer_mask.sum(1).astype(np.int32), answer_prompt))
            scores[members] = np.asarray(result)[:len(members)]

    def sample_tokens(self, prompts, *, n=10, max_new_tokens=32, temperature=1.0, top_p=1.0, seed=0,
                      batch_size=64, max_length=None):
        """Like `sample`, as token ids (EOS and what follows removed)."""
        prompts = _check_texts(prompts, "prompts")
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n={n} and max_new_tokens={max_new_tokens} must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        max_length = max_length or self.config.max_position_embeddings
        if max_new_tokens >= max_length:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_length={max_length}")
        prompt_ids = [ids[-(max_length - max_new_tokens):] for ids in self._prompt_ids(prompts)]
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompts[{i}] is empty (no tokens): nothing to continue")
        rows = _round_up(max(1, min(batch_size // n, len(prompt_ids))), self._data_size)  # prompts per batch
        batches = buckets.length_sorted_batches([len(p) for p in prompt_ids], rows)
        outputs = [None] * len(prompts)
        for batch in _progress(batches, len(batches), "sample"):
            ids, mask = buckets.pad_batch([prompt_ids[i] for i in batch], max_length=max_length - max_new_tokens,
                                          rows=rows)
            lengths = np.maximum(mask.sum(1), 1).astype(np.int32)
            index = np.zeros(rows, np.int32)
            index[:len(batch)] = batch
            tokens = self._generate(
                self.params, *self._put(ids, lengths, index), np.uint32(seed), num_samples=n,
                max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                eos_ids=self.eos_ids)
            tokens = np.asarray(tokens).reshape(rows, n, max_new_tokens)
            for row, i in enumerate(batch):
                outputs[i] = [self._until_eos(t) for t in tokens[row]]
        return outputs

    def _until_eos(self, tokens):
        stops = [k for k, t in enumerate(tokens) if t in self.eos_ids]
        return [int(t) for t in tokens[:stops[0] if stops else len(tokens)]]

    def sample(self, prompts, *, n=10, max_new_tokens=32, temperature=1.0, top_p=1.0, seed=0,
               batch_size=64, max_length=None):
        """n sampled continuations per prompt (decoded new tokens, stopping at EOS): list of lists of str.

        Seeded per (prompt, sample), so results do not depend on batching or the
        mesh; temperature == 0 decodes greedily. Prompts are tokenised as in
        `loglik` and truncated from the left to `max_length - max_new_tokens`.
        """
        tokens = self.sample_tokens(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed, batch_size=batch_size, max_length=max_length)
        return [[self.tokenizer.decode(t, skip_special_tokens=True) for t in row] for row in tokens]
