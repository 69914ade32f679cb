"""The public inference API (`Embedder`), its export format, and the `embed` mode.

An exported folder is at once a Hugging Face checkpoint (`AutoModel`,
`AutoTokenizer`) and a sentence-transformers model with the right pooling,
normalisation and the six task instructions as named prompts (`qa_query`, ...).
"""
import functools
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from llm_embedder_jax import atomic, buckets, encoder, jsonl, paths, sharding, tasks

# Compute dtypes; parameters stay float32. float64 (with jax x64 enabled) serves numerical tests.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
# Facts about an exported encoder's training that decide how it must be used (read by the eval mode).
TRAINING_FILE = "llm_embedder_training.json"


def _check_texts(texts):
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not a single string: wrap it in a list")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return texts


def _row_bucket(n, *, batch_size, multiple):
    """Rows of a padded batch: full batches keep their size; a short last batch rounds up to a power of two."""
    rows = batch_size if n == batch_size else min(1 << (n - 1).bit_length(), batch_size)
    return -(-rows // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _embed(params, ids, mask, *, config, dtype):
    return encoder.embed(params, ids, mask, config=config, dtype=dtype)


class Embedder:
    """A BERT-family embedding model with task instructions, length-bucketed batching and export."""

    def __init__(self, config, params, tokenizer, *, hf_config, max_length=512, dtype="float32", mesh=None):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.config = config
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.max_length = max_length
        self.dtype = dtype
        self.mesh = mesh
        self.params = params if mesh is None else jax.device_put(params, sharding.replicated(mesh))

    @classmethod
    def from_pretrained(cls, path, *, dtype="float32", mesh=None):
        """Loads a Hugging Face / sentence-transformers folder (config.json + safetensors + tokenizer)."""
        from transformers import AutoTokenizer
        config, params, hf_config = encoder.load_hf(path)
        path = pathlib.Path(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{path}: no usable tokenizer files ({e})") from e
        max_length = config.max_position_embeddings - config.position_offset
        st_config = path / "sentence_bert_config.json"
        if st_config.exists():
            max_length = min(max_length, json.loads(st_config.read_text()).get("max_seq_length", max_length))
        return cls(config, params, tokenizer, hf_config=hf_config, max_length=max_length, dtype=dtype, mesh=mesh)

    def with_params(self, params):
        """The same model with other (e.g. fine-tuned) parameters."""
        return Embedder(self.config, params, self.tokenizer, hf_config=self.hf_config,
                        max_length=self.max_length, dtype=self.dtype, mesh=self.mesh)

    def tokenize(self, texts, *, max_length):
        return self.tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]

    def encode(self, texts, kind="query", task=None, batch_size=256, max_length=None, progress=None):
        """L2-normalised float32 embeddings [len(texts), dim], in input order.

        `task` prepends that task's instruction for `kind` ("query" or "key"); None adds none.
        Texts are sorted by length and padded to length buckets, so few shapes compile.
        """
        texts = tasks.with_instruction(_check_texts(texts), task=task, kind=kind)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        max_length = min(max_length or self.max_length, self.max_length)
        token_lists = self.tokenize(texts, max_length=max_length)
        multiple = 1 if self.mesh is None else self.mesh.shape["data"]
        out = np.zeros((len(texts), self.config.hidden_size), np.float32)
        batches = buckets.length_sorted_batches([len(t) for t in token_lists], batch_size)
        if progress is None:
            progress = len(batches) > 8
        from tqdm.auto import tqdm
        for index in tqdm(batches, desc=f"encode {kind}", unit="batch", disable=not progress):
            rows = _row_bucket(len(index), batch_size=batch_size, multiple=multiple)
            ids, mask = buckets.pad_batch([token_lists[i] for i in index], max_length=max_length,
                                          pad_id=self.config.pad_token_id, rows=rows)
            if self.mesh is not None:
                ids, mask = jax.device_put((ids, mask), sharding.data_sharded(self.mesh))
            vectors = _embed(self.params, ids, mask, config=self.config, dtype=DTYPES[self.dtype])
            out[index] = np.asarray(vectors)[:len(index)]
        return out

    def save_pretrained(self, out_dir, *, training=None):
        """Writes a transformers + sentence-transformers folder, atomically; `training` (a dict),
        when given, goes to TRAINING_FILE."""
        from safetensors.numpy import save_file
        params = jax.device_get(self.params)
        tensors = encoder.params_to_hf(params)
        if not all(np.isfinite(v).all() for v in tensors.values()):
            raise ValueError("refusing to export: the parameters contain NaN or Inf")
        with atomic.atomic_dir(out_dir) as tmp:
            hf_config = dict(self.hf_config, architectures=[
                {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}[
                    self.hf_config["model_type"]]])
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
            self.tokenizer.save_pretrained(str(tmp))
            _write_sentence_transformers_files(tmp, pooling=self.config.pooling,
                                               dim=self.config.hidden_size, max_length=self.max_length)
            if training:
                (tmp / TRAINING_FILE).write_text(json.dumps(training, indent=2))
        return paths.as_path(out_dir)


def recorded_lrlm_keys(folder):
    """Whether the folder's encoder was trained on lrlm keys joined with their continuation
    (True / False), or None when its training did not record it."""
    path = pathlib.Path(folder) / TRAINING_FILE
    return json.loads(path.read_text()).get("lrlm_key_with_continuation") if path.is_file() else None


def _write_sentence_transformers_files(folder, *, pooling, dim, max_length):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    (folder / "2_Normalize").mkdir()
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": tasks.prompt_names(),
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }, indent=2))


def read_texts(path, *, field):
    """Texts of a .txt file (one per line) or a JSONL file (`field` of each object)."""
    path = paths.as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8") from None
    # Lines end at "\n" (or "\r\n") only: str.splitlines would also cut a text at \x0c, \x85, \u2028, ...
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()
    if path.suffix not in (".jsonl", ".json"):
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = jsonl.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{number}: no field {field!r} in this record")
        if not isinstance(record[field], str):
            raise ValueError(f"{path}:{number}: field {field!r} is {type(record[field]).__name__}, expected a string")
        texts.append(record[field])
    return texts


def run_embed(config, workdir):
    """`--mode=embed`: a text or JSONL file -> float32 .npy [n, dim] in input order."""
    from llm_embedder_jax import assets, validation
    validation.validate(config, "embed")
    if not config.input:
        raise ValueError("config.input is empty: give the text (.txt) or JSONL file to embed")
    texts = read_texts(config.input, field=config.text_field)
    if not texts:
        raise ValueError(f"{config.input}: no texts to embed")
    # This process's devices: with several processes each embeds all texts (fetching a batch sharded
    # over other hosts' devices is not possible) and process 0 writes them.
    model = Embedder.from_pretrained(config.model or assets.minilm_dir(), dtype=config.dtype,
                                     mesh=sharding.make_mesh(devices=jax.local_devices()))
    vectors = model.encode(texts, kind=config.kind, task=config.task or None,
                           batch_size=config.batch_size, max_length=config.max_length, progress=True)
    output = paths.as_path(config.output or paths.as_path(workdir) / "embeddings.npy")
    if jax.process_index() != 0:
        return output
    with atomic.atomic_file(output, "wb") as f:
        np.save(f, vectors)
    logging.info("wrote %d embeddings of dimension %d to %s", *vectors.shape, output)
    return output
