"""Retrieval: exact top-k search over sharded embeddings, and the retrievers evaluations compare.

Search: the corpus rows are split over the `data` axis of the mesh. Each device
scans its rows chunk by chunk, carrying a running top-k (per-chunk `lax.top_k`,
then a merge), so no device ever holds more than [queries, chunk] scores; the
per-device top-k lists are gathered and merged once. Scores are inner products:
with L2-normalised embeddings, cosine similarities. Ties go to the lower corpus
id, as in a stable sort. Corpus embeddings are cached on disk
(`cached_embeddings`), keyed by a hash of the model and of the texts.
`backend="faiss"` uses an exact faiss `IndexFlatIP` on the host instead, when
faiss is installed (optional; not a requirement of this project).

Retrievers (`build_retriever`): an `Embedder` folder (dense), BM25 (bm25s),
`none` (no retrieval) and `recency` (the latest candidates first). Each ranks a
query's own candidates (`rank`) or searches a corpus (`search`).
"""
import functools
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_embedder_jax import atomic, sharding

BACKENDS = ("jax", "faiss")


def _merge(scores, ids, more_scores, more_ids, k):
    scores = jnp.concatenate([scores, more_scores], axis=1)
    ids = jnp.concatenate([ids, more_ids], axis=1)
    # The running list comes first, and it holds the lower ids: ties keep the lower id.
    top, where = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(ids, where, axis=1)


def _device_top_k(queries, rows, num_valid, *, k, chunk):
    """Top-k of `queries` over this device's corpus rows; runs inside shard_map."""
    num_chunks = rows.shape[0] // chunk
    first_id = jax.lax.axis_index("data") * rows.shape[0]

    def scan_chunk(carry, inputs):
        block, start = inputs
        scores = jnp.dot(queries, block.T, precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)
        ids = start + jnp.arange(chunk, dtype=jnp.int32)
        # Padding rows (past the corpus end) can never be chosen over a real row.
        scores = jnp.where(ids[None, :] < num_valid, scores, -jnp.inf)
        top, where = jax.lax.top_k(scores, min(k, chunk))
        return _merge(*carry, top, ids[where], k), None

    start = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
             jnp.full((queries.shape[0], k), -1, jnp.int32))
    starts = first_id + jnp.arange(num_chunks, dtype=jnp.int32) * chunk
    (scores, ids), _ = jax.lax.scan(scan_chunk, start, (rows.reshape(num_chunks, chunk, -1), starts))
    all_scores = jax.lax.all_gather(scores, "data", axis=1, tiled=True)  # [queries, devices * k]
    all_ids = jax.lax.all_gather(ids, "data", axis=1, tiled=True)
    top, where = jax.lax.top_k(all_scores, k)
    return top, jnp.take_along_axis(all_ids, where, axis=1)


@functools.lru_cache(maxsize=32)
def _search_fn(mesh, k, chunk):
    fn = jax.shard_map(functools.partial(_device_top_k, k=k, chunk=chunk), mesh=mesh,
                       in_specs=(P(), P("data"), P()), out_specs=(P(), P()), check_vma=False)
    return jax.jit(fn)


def _global_array(host_array, sharding_):
    return jax.make_array_from_callback(host_array.shape, sharding_, lambda index: host_array[index])


def _padded_rows(embeddings, padded_size):
    """The rows [start, stop) of `embeddings` zero-padded to `padded_size` rows, read on demand.

    Each process reads only the rows of its own devices: cheap on a memory-mapped cache file.
    """
    def read(index):
        start, stop, _ = index[0].indices(padded_size)
        block = np.asarray(embeddings[start:min(stop, len(embeddings))], np.float32)
        padding = np.zeros((stop - start - len(block), embeddings.shape[1]), np.float32)
        return np.concatenate([block, padding])[:, index[1]]
    return read


class ShardedCorpus:
    """Key embeddings [n, d] (float32) on the mesh, split over `data`, padded to whole chunks per device."""

    def __init__(self, embeddings, *, mesh=None, chunk_size=16384):
        if embeddings.ndim != 2 or not embeddings.shape[0]:
            raise ValueError(f"corpus embeddings must be a non-empty [n, dim] array, got shape {embeddings.shape}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.mesh = mesh or sharding.make_mesh()
        self.size, self.dim = embeddings.shape
        devices = self.mesh.shape["data"]
        per_device = -(-self.size // devices)
        self.chunk = min(chunk_size, per_device)
        padded_size = devices * -(-per_device // self.chunk) * self.chunk
        self.rows = jax.make_array_from_callback((padded_size, self.dim), NamedSharding(self.mesh, P("data")),
                                                 _padded_rows(embeddings, padded_size))

    def search(self, queries, *, k, query_batch=256):
        """(scores float32 [q, k], ids int32 [q, k]), best first, for query embeddings [q, d]."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [q, {self.dim}] to match the corpus, got shape {queries.shape}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be between 1 and the corpus size {self.size}")
        fn = _search_fn(self.mesh, k, self.chunk)
        replicated = sharding.replicated(self.mesh)
        num_valid = _global_array(np.int32(self.size), replicated)
        # Every block is padded to `query_batch` rows: one compiled shape for the whole run.
        rows = min(query_batch, max(1, len(queries)))
        scores, ids = np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int32)
        for start in range(0, len(queries), rows):
            block = queries[start:start + rows]
            padded = np.zeros((rows, self.dim), queries.dtype)
            padded[:len(block)] = block
            top, top_ids = fn(_global_array(padded, replicated), self.rows, num_valid)
            scores[start:start + len(block)] = np.asarray(top)[:len(block)]  # also waits on each block
            ids[start:start + len(block)] = np.asarray(top_ids)[:len(block)]
        return scores, ids


def faiss_search(queries, corpus, *, k):
    """Exact inner-product search with faiss on the host: (scores [q, k], ids [q, k])."""
    try:
        import faiss
    except ImportError:
        raise ImportError("backend='faiss' needs the faiss package (faiss-cpu or faiss-gpu), which is not "
                          "installed; use backend='jax' (exact, sharded over the devices)") from None
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, np.float32))
    scores, ids = index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, ids.astype(np.int32)


def search_embeddings(queries, corpus, *, k, backend="jax", mesh=None, chunk_size=16384, query_batch=256):
    """Exact top-k of query embeddings [q, d] over corpus embeddings [n, d]."""
    if backend == "faiss":
        return faiss_search(queries, corpus, k=k)
    if backend != "jax":
        raise ValueError(f"unknown search backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return ShardedCorpus(np.asarray(corpus), mesh=mesh, chunk_size=chunk_size).search(
        queries, k=k, query_batch=query_batch)


def texts_digest(texts):
    """sha256 of a list of texts (length-prefixed, so the split between texts counts)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cached_embeddings(encode, texts, *, cache_dir, key):
    """`encode(texts)`, read from `cache_dir/<hash>.npy` when that exists, else computed and saved.

    `key` names everything besides the texts that changes the vectors (model
    fingerprint, instruction, kind, max length). The file is written atomically
    and read memory-mapped, so a million-row corpus is not copied into memory.
    """
    if not cache_dir:
        return encode(texts)
    name = hashlib.sha256(f"{key}\0{texts_digest(texts)}".encode()).hexdigest()[:32]
    path = pathlib.Path(cache_dir) / f"{name}.npy"
    if path.exists():
        vectors = np.load(path, mmap_mode="r")
        if vectors.shape[0] != len(texts):
            raise ValueError(f"embedding cache {path} holds {vectors.shape[0]} rows for {len(texts)} texts: "
                             "it is corrupt; delete it")
        return vectors
    vectors = np.asarray(encode(texts), np.float32)
    with atomic.atomic_file(path, "wb") as f:
        np.save(f, vectors)
    return vectors


# ----------------------------------------------------------------------------- retrievers
# `rank` and `search` both return one int array per query, best first.


class Retriever:
    name = "retriever"
    lrlm_key_with_continuation = None  # how the encoder's lrlm training keys were formed, if recorded

    def applies_to(self, task):
        return True

    def scores(self, queries, candidates_per_query, *, task):
        raise NotImplementedError

    def rank(self, queries, candidates_per_query, *, task):
        """Candidate indices per query, best first.

        Ties break in a fixed pseudo-random order: data often lists the positives
        first, and a tie must not hand them to the retriever.
        """
        scores = self.scores(queries, candidates_per_query, task=task)
        return [np.lexsort((np.random.default_rng(i).permutation(len(s)), -s)) for i, s in enumerate(scores)]

    def search(self, queries, corpus, *, task, k):
        raise NotImplementedError


def _check_queries(queries, candidates_per_query=None):
    for i, query in enumerate(queries):
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query {i} is empty: there is nothing to retrieve with")
    if candidates_per_query is not None and len(candidates_per_query) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(candidates_per_query)} candidate lists")


class EmbedderRetriever(Retriever):
    """Dense retrieval with an `Embedder`: inner products of L2-normalised embeddings.

    `instructions` prepends the task instructions (for models trained with them);
    `fingerprint` identifies the weights in the embedding cache.
    """

    def __init__(self, embedder, *, name, instructions, fingerprint, batch_size=256, max_length=256,
                 cache_dir="", backend="jax", chunk_size=16384, query_batch=256, mesh=None):
        self.embedder, self.name, self.instructions = embedder, name, instructions
        self.fingerprint, self.batch_size, self.max_length = fingerprint, batch_size, max_length
        self.cache_dir, self.backend, self.mesh = cache_dir, backend, mesh
        self.chunk_size, self.query_batch = chunk_size, query_batch

    def _encode(self, texts, *, kind, task):
        return self.embedder.encode(list(texts), kind=kind, task=task if self.instructions else None,
                                    batch_size=self.batch_size, max_length=self.max_length)

    def scores(self, queries, candidates_per_query, *, task):
        _check_queries(queries, candidates_per_query)
        query_vectors = self._encode(queries, kind="query", task=task)
        keys = {text: i for i, text in enumerate(dict.fromkeys(t for c in candidates_per_query for t in c))}
        key_vectors = self._encode(keys, kind="key", task=task)
        return [key_vectors[[keys[t] for t in c]] @ q if c else np.zeros(0, np.float32)
                for q, c in zip(query_vectors, candidates_per_query)]

    def search(self, queries, corpus, *, task, k):
        _check_queries(queries)
        query_vectors = self._encode(queries, kind="query", task=task)
        key = f"{self.fingerprint}|{task if self.instructions else ''}|key|{self.max_length}"
        corpus_vectors = cached_embeddings(lambda texts: self._encode(texts, kind="key", task=task), list(corpus),
                                           cache_dir=self.cache_dir, key=key)
        _, ids = search_embeddings(query_vectors, corpus_vectors, k=min(k, len(corpus)), backend=self.backend,
                        mesh=self.mesh, chunk_size=self.chunk_size, query_batch=self.query_batch)
        return list(ids)


class BM25Retriever(Retriever):
    """Lexical retrieval (bm25s, Lucene BM25, English stop words, no stemming)."""
    name = "bm25"

    @staticmethod
    def _index(texts):
        import bm25s
        index = bm25s.BM25()
        index.index(bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False),
                    show_progress=False)
        return index

    @staticmethod
    def _tokens(queries):
        import bm25s
        return bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)

    def _all_scores(self, queries, texts):
        """BM25 scores of every text of `texts`, one query at a time (never [queries, texts] at once)."""
        index = self._index(texts)
        for tokens in self._tokens(queries):
            # A query made only of stop words matches nothing (bm25s cannot score an empty query).
            yield np.asarray(index.get_scores(tokens), np.float32) if tokens else np.zeros(len(texts), np.float32)

    def scores(self, queries, candidates_per_query, *, task):
        _check_queries(queries, candidates_per_query)
        keys = {text: i for i, text in enumerate(dict.fromkeys(t for c in candidates_per_query for t in c))}
        return [s[[keys[t] for t in c]] for s, c in zip(self._all_scores(queries, list(keys)), candidates_per_query)]

    def search(self, queries, corpus, *, task, k):
        _check_queries(queries)
        k = min(k, len(corpus))
        ranked = []
        for s in self._all_scores(queries, list(corpus)):
            top = np.sort(np.argpartition(-s, k - 1)[:k])  # ids ascending, so ties keep the lower id
            ranked.append(top[np.argsort(-s[top], kind="stable")])
        return ranked


class NoRetriever(Retriever):
    """No retrieval: the LLM answers from the query alone."""
    name = "none"

    def applies_to(self, task):
        return task not in ("tool", "convsearch")  # nothing to score where retrieval is the output

    def rank(self, queries, candidates_per_query, *, task):
        return [np.zeros(0, np.int64) for _ in queries]

    def search(self, queries, corpus, *, task, k):
        return [np.zeros(0, np.int64) for _ in queries]


class RecencyRetriever(Retriever):
    """The most recent candidates first: for ordered histories (lrlm chunks, chat turns)."""
    name = "recency"

    def applies_to(self, task):
        return task in ("lrlm", "chat")

    def rank(self, queries, candidates_per_query, *, task):
        return [np.arange(len(c))[::-1] for c in candidates_per_query]

    def search(self, queries, corpus, *, task, k):
        raise ValueError("the recency retriever ranks a query's own ordered history; a corpus has no order")


BUILTIN_RETRIEVERS = {"bm25": BM25Retriever, "none": NoRetriever, "recency": RecencyRetriever}


def model_fingerprint(folder):
    """sha256 of a model folder's config and weights: the embedding cache's notion of "the same model"."""
    digest = hashlib.sha256()
    files = sorted(p for p in pathlib.Path(folder).iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    for path in files:
        with open(path, "rb") as f:
            digest.update(path.name.encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _trained_with_instructions(folder):
    # Folders exported by this project name the task instructions as sentence-transformers prompts.
    path = pathlib.Path(folder) / "config_sentence_transformers.json"
    return path.exists() and "qa_query" in (json.loads(path.read_text()).get("prompts") or {})


def build_retriever(spec, config, *, mesh):
    """A retriever from "bm25" | "none" | "recency" | "minilm" | "<folder>" | "<name>=<any of those>"."""
    from llm_embedder_jax import assets
    from llm_embedder_jax.export import Embedder, recorded_lrlm_keys
    name, sep, target = spec.partition("=")
    if not sep:
        name, target = "", spec
    if target in BUILTIN_RETRIEVERS:
        retriever = BUILTIN_RETRIEVERS[target]()
        retriever.name = name or target
        return retriever
    folder = assets.minilm_dir() if target == "minilm" else pathlib.Path(target)
    if not (folder / "config.json").is_file():
        raise ValueError(f"retriever {spec!r}: {folder} is not a model folder (no config.json); expected "
                         f"{', '.join(BUILTIN_RETRIEVERS)}, minilm, or an exported model folder")
    if config.instructions not in ("auto", "always", "never"):
        raise ValueError(f"instructions must be 'auto', 'always' or 'never', got {config.instructions!r}")
    instructions = config.instructions == "always" or (
        config.instructions == "auto" and _trained_with_instructions(folder))
    retriever = EmbedderRetriever(
        Embedder.from_pretrained(folder, mesh=mesh), name=name or ("minilm" if target == "minilm" else folder.name),
        instructions=instructions, fingerprint=model_fingerprint(folder), batch_size=config.embed.batch_size,
        max_length=config.embed.max_length, cache_dir=config.search.cache_dir, backend=config.search.backend,
        chunk_size=config.search.chunk_size, query_batch=config.search.query_batch, mesh=mesh)
    retriever.lrlm_key_with_continuation = recorded_lrlm_keys(folder)
    return retriever
