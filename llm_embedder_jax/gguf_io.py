"""GGUF (llama.cpp) checkpoints -> `LlamaConfig` + the parameter pytree of `llm.py`.

Quantised tensors are dequantised to float32 with `gguf.quants.dequantize`.
Two layout facts of the format:

- numpy shapes are GGUF shapes reversed, so a dequantised matrix comes out
  (out, in) like a PyTorch weight;
- for the `llama` architecture llama.cpp permutes the rows of attn_q/attn_k
  (interleaved rotary pairs); `_unpermute_rows` restores the half-split
  layout that Hugging Face checkpoints and `llm.py` use.
"""
import pathlib

import gguf
import numpy as np

from llm_embedder_jax import llm

# llama.cpp architecture name -> does it permute the rows of attn_q / attn_k?
ARCHITECTURES = {"llama": True, "qwen2": False}

# GGUF tensor name inside block i -> our layer parameter name.
LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm", "ffn_norm.weight": "mlp_norm",
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v", "attn_output.weight": "o",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
    "ffn_gate.weight": "gate", "ffn_up.weight": "up", "ffn_down.weight": "down",
}


def _field(reader, key, path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"{path}: GGUF metadata field {key!r} is missing")
        return default
    return field.contents()


def read_config(reader, path):
    """`LlamaConfig` from the GGUF metadata (and the rope_freqs tensor, when present)."""
    arch = _field(reader, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF field 'general.architecture' is {arch!r}; "
            f"supported: {', '.join(ARCHITECTURES)}")
    hidden = int(_field(reader, f"{arch}.embedding_length", path))
    heads = int(_field(reader, f"{arch}.attention.head_count", path))
    tensor_names = {t.name for t in reader.tensors}
    vocab = reader.fields.get(f"{arch}.vocab_size")
    vocab = int(vocab.contents()) if vocab is not None else len(_field(reader, "tokenizer.ggml.tokens", path))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", path, hidden // heads))
    rope_divisors = None
    if "rope_freqs.weight" in tensor_names:  # Llama-3.1 style rope scaling, stored as per-frequency divisors
        rope_divisors = tuple(float(x) for x in _dequantize(_tensor(reader, "rope_freqs.weight")))
    return llm.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=int(_field(reader, f"{arch}.block_count", path)),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", path, heads)),
        head_dim=head_dim,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", path)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
        rope_divisors=rope_divisors,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", path)),
    )


def _tensor(reader, name):
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(name)


def _dequantize(tensor):
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(array, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _unpermute_rows(weight, heads):
    """Undo llama.cpp's rotary row permutation of a (heads * head_dim, in) matrix."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf(path, *, dtype):
    """(config, params) of a GGUF file, params as numpy arrays of `dtype`."""
    path = pathlib.Path(path)
    reader = gguf.GGUFReader(str(path))
    config = read_config(reader, path)
    permuted = ARCHITECTURES[_field(reader, "general.architecture", path)]
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue
        weight = _dequantize(tensor)
        if permuted and tensor.name.endswith("attn_q.weight"):
            weight = _unpermute_rows(weight, config.num_heads)
        elif permuted and tensor.name.endswith("attn_k.weight"):
            weight = _unpermute_rows(weight, config.num_kv_heads)
        tensors[tensor.name] = weight

    return config, llm.assemble_params(tensors, config=config, dtype=dtype, where=path, embed="token_embd.weight",
                                       final_norm="output_norm.weight", lm_head="output.weight",
                                       layer_key="blk.{i}.{name}", layer_names=LAYER_TENSORS)
