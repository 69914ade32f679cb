"""Sharded exact search against numpy brute force, the embedding cache, and the retrievers."""
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from llm_embedder_jax import search, sharding


def _brute_force(queries, corpus, k):
    scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(1003, 16)).astype(np.float32)  # divisible by neither 8 devices nor any chunk
    queries = rng.normal(size=(13, 16)).astype(np.float32)
    return queries, corpus


@pytest.mark.parametrize("k,chunk_size,query_batch,model_parallel", [
    (37, 16, 5, 1),      # k larger than a chunk; query blocks that do not divide the queries
    (5, 4096, 256, 1),   # one chunk per device
    (1003, 7, 13, 1),    # k = the whole corpus: a full sort
    (9, 10, 4, 2),       # a (4 data, 2 model) mesh: corpus split over 4 devices, replicated over 2
])
def test_sharded_search_equals_brute_force(vectors, k, chunk_size, query_batch, model_parallel):
    queries, corpus = vectors
    mesh = sharding.make_mesh(model_parallel=model_parallel)
    assert jax.device_count() == 8
    scores, ids = search.search_embeddings(queries, corpus, k=k, mesh=mesh, chunk_size=chunk_size,
                                           query_batch=query_batch)
    ref_scores, ref_ids = _brute_force(queries, corpus, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int32


def test_ties_go_to_the_lower_id():
    corpus = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1]], np.float32)
    scores, ids = search.search_embeddings(np.array([[1, 0], [0, 1]], np.float32), corpus, k=3, chunk_size=1)
    np.testing.assert_array_equal(ids, [[0, 2, 3], [1, 4, 0]])
    np.testing.assert_array_equal(scores, [[1, 1, 1], [1, 1, 0]])


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _shapes(inner)


def test_search_never_holds_a_query_by_corpus_score_matrix(vectors):
    queries, corpus = vectors
    index = search.ShardedCorpus(corpus, chunk_size=16)
    per_device_rows = index.rows.shape[0] // 8
    assert per_device_rows == 128 and index.chunk == 16
    fn = search._search_fn(index.mesh, 5, index.chunk)
    jaxpr = jax.make_jaxpr(fn)(queries, index.rows, np.int32(index.size)).jaxpr
    shapes = list(_shapes(jaxpr))
    assert (13, 16) in shapes  # one chunk's scores
    with_queries = [s for s in shapes if 13 in s]
    assert max(int(np.prod(s)) for s in with_queries) < 13 * per_device_rows, with_queries


def test_search_errors_name_the_problem(vectors):
    queries, corpus = vectors
    with pytest.raises(ValueError, match="k=1004 must be between 1 and the corpus size 1003"):
        search.search_embeddings(queries, corpus, k=1004)
    with pytest.raises(ValueError, match=r"queries must be \[q, 16\]"):
        search.search_embeddings(queries[:, :8], corpus, k=3)
    with pytest.raises(ValueError, match="non-empty"):
        search.search_embeddings(queries, corpus[:0], k=1)
    with pytest.raises(ValueError, match="unknown search backend 'annoy'"):
        search.search_embeddings(queries, corpus, k=1, backend="annoy")


def test_faiss_backend_is_exact_or_explains_its_absence(vectors):
    queries, corpus = vectors
    try:
        import faiss  # noqa: F401  (optional: not a requirement of the project)
    except ImportError:
        with pytest.raises(ImportError, match="faiss package .* not installed; use backend='jax'"):
            search.search_embeddings(queries, corpus, k=4, backend="faiss")
    else:
        _, ids = search.search_embeddings(queries, corpus, k=4, backend="faiss")
        np.testing.assert_array_equal(ids, _brute_force(queries, corpus, 4)[1])


def test_embedding_cache_encodes_once_per_model_and_corpus(tmp_path):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.arange(len(texts) * 3, dtype=np.float32).reshape(len(texts), 3)

    texts = ["a", "b", "c"]
    first = search.cached_embeddings(encode, texts, cache_dir=tmp_path, key="model-1")
    again = search.cached_embeddings(encode, texts, cache_dir=tmp_path, key="model-1")
    assert len(calls) == 1
    np.testing.assert_array_equal(first, again)
    search.cached_embeddings(encode, texts, cache_dir=tmp_path, key="model-2")
    search.cached_embeddings(encode, ["ab", "c"], cache_dir=tmp_path, key="model-1")
    search.cached_embeddings(encode, ["a", "bc"], cache_dir=tmp_path, key="model-1")  # same characters, other split
    assert len(calls) == 4
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 4 and all(f.endswith(".npy") and not f.startswith(".") for f in files)  # no temp files left
    # A cache file that does not match its corpus is an error, not a silent mismatch.
    for name in files:
        np.save(tmp_path / name, np.zeros((7, 3), np.float32))
    with pytest.raises(ValueError, match="holds 7 rows for 3 texts: it is corrupt"):
        search.cached_embeddings(encode, texts, cache_dir=tmp_path, key="model-1")


@pytest.fixture(scope="module")
def minilm_retriever(minilm_dir):
    config = ml_collections.ConfigDict(dict(
        instructions="auto", embed=dict(batch_size=32, max_length=64),
        search=dict(cache_dir="", backend="jax", chunk_size=8, query_batch=4)))
    return search.build_retriever(f"mini={minilm_dir}", config, mesh=sharding.make_mesh())


def test_embedder_retriever_ranks_and_searches_like_brute_force(minilm_retriever, real_texts):
    corpus = [t[:200] for t in real_texts[:29]]
    queries = [t[:80] for t in real_texts[3:8]]
    assert minilm_retriever.name == "mini" and not minilm_retriever.instructions  # MiniLM has no instructions
    q = minilm_retriever.embedder.encode(queries, kind="query", max_length=64)
    c = minilm_retriever.embedder.encode(corpus, kind="key", max_length=64)
    ranked = minilm_retriever.search(queries, corpus, task="tool", k=6)
    np.testing.assert_array_equal(np.stack(ranked), _brute_force(q, c, 6)[1])
    # Each query is a prefix of corpus text 3 + i: it must come first.
    assert [r[0] for r in ranked] == [3, 4, 5, 6, 7]
    candidates = [corpus[i:i + 4] for i in range(3, 8)]
    scores = minilm_retriever.scores(queries, candidates, task="tool")
    for qv, cands, s in zip(q, candidates, scores):
        np.testing.assert_allclose(s, c[[corpus.index(t) for t in cands]] @ qv, atol=1e-5)
    assert all(r[0] == 0 for r in minilm_retriever.rank(queries, candidates, task="tool"))


def test_bm25_retriever_prefers_lexical_matches():
    bm25 = search.BM25Retriever()
    corpus = ["the cat sat on the mat", "dogs chase cats", "a report on quarterly revenue", "the mat was red"]
    ranked = bm25.search(["revenue report", "red mat"], corpus, task="qa", k=2)
    assert ranked[0][0] == 2 and ranked[1][0] == 3 and ranked[1][1] == 0
    scores = bm25.scores(["quarterly revenue", "of the"], [corpus[:3], corpus[1:]], task="qa")
    assert np.argmax(scores[0]) == 2
    np.testing.assert_array_equal(scores[1], 0)  # only stop words: matches nothing, no error


def test_ties_do_not_favour_the_first_candidate():
    class Constant(search.Retriever):
        def scores(self, queries, candidates_per_query, *, task):
            return [np.zeros(len(c)) for c in candidates_per_query]

    ranked = Constant().rank(["q"] * 20, [["a", "b", "c", "d"]] * 20, task="icl")
    firsts = [int(r[0]) for r in ranked]
    assert len(set(firsts)) > 1  # a tie does not hand the first (often the positive) candidate the win
    again = Constant().rank(["q"] * 20, [["a", "b", "c", "d"]] * 20, task="icl")
    assert [r.tolist() for r in ranked] == [r.tolist() for r in again]  # but deterministically
    assert all(sorted(r.tolist()) == [0, 1, 2, 3] for r in ranked)


def test_baseline_retrievers_and_bad_queries():
    none, recency = search.NoRetriever(), search.RecencyRetriever()
    assert [r.size for r in none.rank(["q", "r"], [["a"], ["b", "c"]], task="chat")] == [0, 0]
    assert [r.tolist() for r in recency.rank(["q", "r"], [["a"], ["b", "c", "d"]], task="lrlm")] == [[0], [2, 1, 0]]
    assert none.applies_to("qa") and not none.applies_to("tool")
    assert recency.applies_to("chat") and not recency.applies_to("qa")
    with pytest.raises(ValueError, match="query 1 is empty"):
        search.BM25Retriever().rank(["fine", "  "], [["a"], ["b"]], task="qa")
    with pytest.raises(ValueError, match="2 queries but 1 candidate lists"):
        search.BM25Retriever().rank(["a", "b"], [["a"]], task="qa")


def test_build_retriever_specs(tmp_path, minilm_dir):
    config = ml_collections.ConfigDict(dict(
        instructions="auto", embed=dict(batch_size=8, max_length=32),
        search=dict(cache_dir="", backend="jax", chunk_size=8, query_batch=4)))
    assert isinstance(search.build_retriever("bm25", config, mesh=None), search.BM25Retriever)
    named = search.build_retriever("baseline=none", config, mesh=None)
    assert isinstance(named, search.NoRetriever) and named.name == "baseline"
    with pytest.raises(ValueError, match="is not a model folder"):
        search.build_retriever(str(tmp_path / "missing"), config, mesh=None)
    # A folder exported by this project records the instructions: "auto" uses them.
    folder = tmp_path / "exported"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        if (pathlib.Path(minilm_dir) / name).exists():
            (folder / name).symlink_to(pathlib.Path(minilm_dir) / name)
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"qa_query": "Represent"}}))
    exported = search.build_retriever(str(folder), config, mesh=None)
    assert exported.instructions and exported.name == "exported"
    assert exported.fingerprint == search.build_retriever(f"other={minilm_dir}", config, mesh=None).fingerprint
