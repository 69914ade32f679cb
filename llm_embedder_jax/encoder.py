"""BERT-family encoder (BERT, bge, MiniLM, RoBERTa) as pure functions over a parameter pytree.

Parameters are a nested dict of arrays with every transformer layer stacked on a
leading axis, so the forward pass is one `lax.scan` (one compiled layer, fast
compiles, per-layer rematerialisation for free). Kernels are stored (in, out);
Hugging Face stores (out, in), so loading transposes once.
"""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from llm_embedder_jax import safetensors_io

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    # RoBERTa counts positions from pad_token_id + 1; BERT from 0.
    position_offset: int = 0
    pooling: str = "cls"  # "cls" or "mean"
    pad_token_id: int = 0

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


def config_from_hf(hf_config, *, pooling="cls"):
    """EncoderConfig from a Hugging Face config.json dict."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}: this encoder supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported position_embedding_type={hf_config['position_embedding_type']!r}")
    act = hf_config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act={act!r}: expected one of {', '.join(ACTIVATIONS)}")
    pad = hf_config.get("pad_token_id") or 0
    return EncoderConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        intermediate_size=hf_config["intermediate_size"],
        max_position_embeddings=hf_config.get("max_position_embeddings", 512),
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        hidden_act=act,
        position_offset=pad + 1 if model_type != "bert" else 0,
        pooling=pooling,
        pad_token_id=pad,
    )


def _at_least_f32(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _layer_norm(x, scale, bias, eps):
    wide = _at_least_f32(x)
    mean = wide.mean(-1, keepdims=True)
    var = jnp.square(wide - mean).mean(-1, keepdims=True)
    return ((wide - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def _dense(x, p):
    return x @ p["kernel"].astype(x.dtype) + p["bias"].astype(x.dtype)


def attention_impl(dtype, head_dim):
    """"cudnn" where its fused flash kernel applies (GPU, half precision, head size), else "xla".

    XLA's attention keeps [B, heads, T, T] scores in float32 for the backward
    pass: for a base-size encoder on 64x8 keys of 256 tokens that alone
    exceeds 100 GiB, where the fused kernel keeps none.
    """
    fused = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
             and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if fused else "xla"


def _layer(config, x, lengths, p):
    batch, seq, _ = x.shape
    heads = lambda t: t.reshape(batch, seq, config.num_heads, config.head_dim)
    q, k, v = (heads(_dense(x, p[name])) for name in ("query", "key", "value"))
    impl = attention_impl(x.dtype, config.head_dim)
    if impl == "cudnn":
        lengths = jnp.maximum(lengths, 1)  # all-padding filler rows: the fused kernel wants a real token
    # Sequence lengths (right padding) rather than a dense mask: cuDNN's fused kernel takes them directly.
    attn = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                        implementation=impl)
    attn = _dense(attn.reshape(batch, seq, config.hidden_size), p["attention_out"])
    x = _layer_norm(x + attn, p["attention_ln"]["scale"], p["attention_ln"]["bias"], config.layer_norm_eps)
    h = ACTIVATIONS[config.hidden_act](_dense(x, p["intermediate"]))
    return _layer_norm(x + _dense(h, p["output"]), p["output_ln"]["scale"], p["output_ln"]["bias"],
                       config.layer_norm_eps)


def hidden_states(params, ids, mask, *, config, dtype=jnp.float32, remat="none"):
    """Last hidden states [B, T, H] in `dtype`; `mask` marks real tokens (right padding)."""
    ids = jnp.asarray(ids)
    mask = jnp.asarray(mask)
    lengths = mask.sum(-1).astype(jnp.int32)
    emb = params["embeddings"]
    positions = jnp.arange(ids.shape[1])[None, :] + config.position_offset
    x = emb["word"][ids] + emb["position"][positions] + emb["token_type"][0]
    x = _layer_norm(x, emb["ln"]["scale"], emb["ln"]["bias"], config.layer_norm_eps).astype(dtype)

    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
    layer = lambda carry, p: (_layer(config, carry, lengths, p), None)
    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)
    x, _ = jax.lax.scan(layer, x, params["layers"])
    return x


def pool(hidden, mask, *, pooling):
    """Sentence vector in (at least) float32: the CLS token, or the mean over real tokens."""
    hidden = _at_least_f32(hidden)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.astype(hidden.dtype)[..., None]
        # Clamp as sentence-transformers does, so an all-padding row gives zeros, not NaN.
        return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    raise ValueError(f"unknown pooling {pooling!r}: expected 'cls' or 'mean'")


def normalize(x, eps=1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def embed(params, ids, mask, *, config, dtype=jnp.float32, remat="none"):
    """L2-normalised embeddings [B, H], float32 (float64 under a float64 `dtype`)."""
    h = hidden_states(params, ids, mask, config=config, dtype=dtype, remat=remat)
    return normalize(pool(h, jnp.asarray(mask), pooling=config.pooling))


def init_params(rng, config):
    """Random parameters (BERT's N(0, 0.02) init), for benchmarks and tests."""
    h, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    keys = iter(jax.random.split(rng, 16))
    normal = lambda shape: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)
    dense = lambda i, o: {"kernel": normal((n, i, o)), "bias": jnp.zeros((n, o), jnp.float32)}
    ln = lambda *lead: {"scale": jnp.ones((*lead, h), jnp.float32), "bias": jnp.zeros((*lead, h), jnp.float32)}
    return {
        "embeddings": {
            "word": normal((config.vocab_size, h)),
            "position": normal((config.max_position_embeddings, h)),
            "token_type": normal((config.type_vocab_size, h)),
            "ln": ln(),
        },
        "layers": {
            "query": dense(h, h), "key": dense(h, h), "value": dense(h, h),
            "attention_out": dense(h, h), "attention_ln": ln(n),
            "intermediate": dense(h, f), "output": dense(f, h), "output_ln": ln(n),
        },
    }


# Our layer parameter -> Hugging Face name inside `encoder.layer.{i}.`; kernels are transposed.
_HF_LAYER_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_out": "attention.output.dense",
    "attention_ln": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_ln": "output.LayerNorm",
}
_HF_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight"}
_HF_EMBEDDINGS = {
    "word": "embeddings.word_embeddings.weight",
    "position": "embeddings.position_embeddings.weight",
    "token_type": "embeddings.token_type_embeddings.weight",
}


def _hf_prefix(tensors):
    """Checkpoints saved from BertModel have bare names; from BertForX they start with 'bert.'."""
    for prefix in ("", "bert.", "roberta.", "model."):
        if prefix + "embeddings.word_embeddings.weight" in tensors:
            return prefix
    raise ValueError("no embeddings.word_embeddings.weight among the checkpoint's tensors: "
                     "not a BERT-family encoder checkpoint")


def params_from_hf(tensors, config):
    """Parameter pytree from a flat {hf_name: np.ndarray} dict."""
    prefix = _hf_prefix(tensors)

    def get(name):
        try:
            return np.asarray(tensors[prefix + name], np.float32)
        except KeyError:
            raise ValueError(f"the checkpoint has no tensor {prefix + name!r}") from None

    def stacked(ours, leaf):
        arrays = [get(f"encoder.layer.{i}.{_HF_LAYER_NAMES[ours]}.{_HF_LEAF[leaf]}")
                  for i in range(config.num_layers)]
        return jnp.asarray(np.stack([a.T if leaf == "kernel" else a for a in arrays]))

    layers = {ours: {leaf: stacked(ours, leaf) for leaf in (("scale", "bias") if ours.endswith("_ln")
                                                            else ("kernel", "bias"))}
              for ours in _HF_LAYER_NAMES}
    embeddings = {ours: jnp.asarray(get(name)) for ours, name in _HF_EMBEDDINGS.items()}
    embeddings["ln"] = {"scale": jnp.asarray(get("embeddings.LayerNorm.weight")),
                        "bias": jnp.asarray(get("embeddings.LayerNorm.bias"))}
    return {"embeddings": embeddings, "layers": layers}


def params_to_hf(params):
    """Flat {hf_name: np.ndarray float32} with BertModel names, (out, in) kernels."""
    out = {name: np.asarray(params["embeddings"][ours], np.float32) for ours, name in _HF_EMBEDDINGS.items()}
    out["embeddings.LayerNorm.weight"] = np.asarray(params["embeddings"]["ln"]["scale"], np.float32)
    out["embeddings.LayerNorm.bias"] = np.asarray(params["embeddings"]["ln"]["bias"], np.float32)
    for ours, hf_name in _HF_LAYER_NAMES.items():
        for leaf, value in params["layers"][ours].items():
            value = np.asarray(value, np.float32)
            for i in range(value.shape[0]):
                out[f"encoder.layer.{i}.{hf_name}.{_HF_LEAF[leaf]}"] = np.ascontiguousarray(
                    value[i].T if leaf == "kernel" else value[i])
    return out


def read_pooling(folder):
    """'mean' or 'cls' from sentence-transformers' 1_Pooling/config.json; CLS when absent."""
    folder = pathlib.Path(folder)
    modules = folder / "modules.json"
    pooling_dir = folder / "1_Pooling"
    if modules.exists():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Pooling"):
                pooling_dir = folder / module["path"]
    config_file = pooling_dir / "config.json"
    if not config_file.exists():
        return "cls"
    pooling = json.loads(config_file.read_text())
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    raise ValueError(f"{config_file}: only CLS or mean-token pooling is supported")


def load_hf(folder):
    """(EncoderConfig, params, hf_config dict) from a Hugging Face checkpoint folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder}: no config.json")
    hf_config = json.loads(config_file.read_text())
    config = config_from_hf(hf_config, pooling=read_pooling(folder))
    return config, params_from_hf(safetensors_io.read_folder(folder), config), hf_config
