"""Retrieval metrics (by hand and against a plain-Python reference), downstream evaluations on the
toy data with SmolLM2 + MiniLM, the eval mode end to end, and bad input."""
import importlib.util
import itertools
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from llm_embedder_jax import evaluate, metrics, rewards, search, tasks
from llm_embedder_jax.data import records

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- metrics

def test_rerank_metrics_hand_computed():
    # Ranked by score: grades 0, 2, 1 (the relevant candidates are 2nd and 3rd).
    got = metrics.rerank_metrics([np.array([0.9, 0.8, 0.1])], [np.array([0, 2, 1])], ks=(1, 2, 3))
    dcg2, idcg2 = 2 / math.log2(3), 2 + 1 / math.log2(3)
    dcg3, idcg3 = dcg2 + 1 / math.log2(4), idcg2
    expected = {"mrr@1": 0.0, "mrr@2": 0.5, "mrr@3": 0.5, "recall@1": 0.0, "recall@2": 0.5, "recall@3": 1.0,
                "ndcg@1": 0.0, "ndcg@2": dcg2 / idcg2, "ndcg@3": dcg3 / idcg3}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    # Two queries average; a perfect ranking scores 1 everywhere.
    two = metrics.rerank_metrics([np.array([0.9, 0.8, 0.1]), np.array([3.0, 1.0])], [[0, 2, 1], [1, 0]], ks=(1,))
    assert two["mrr@1"] == pytest.approx(0.5) and two["ndcg@1"] == pytest.approx(0.5)


def test_rerank_ties_earn_no_credit():
    # Constant scores (an untrained model, a collapsed one): the relevant candidate ranks last among equals.
    got = metrics.rerank_metrics([np.zeros(4)], [np.array([1, 0, 0, 0])], ks=(1, 4))
    assert got["mrr@1"] == 0.0 and got["mrr@4"] == pytest.approx(0.25)
    assert got["recall@4"] == 1.0


def test_search_metrics_hand_computed():
    run = {"q1": ["d3", "d1", "d9"], "q2": ["d2"]}
    qrels = {"q1": {"d1": 1, "d2": 1, "d3": 0}, "q2": {"d2": 3, "d4": 1}}
    got = metrics.search_metrics(run, qrels, ks=(2,))
    assert got["mrr@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert got["recall@2"] == pytest.approx((0.5 + 0.5) / 2)
    ndcg_q1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    ndcg_q2 = 3 / (3 + 1 / math.log2(3))
    assert got["ndcg@2"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)


def _reference(ranked, judgements, k):
    """MRR, Recall, NDCG at k of one ranking, written from the textbook definitions."""
    reciprocal_rank = 0.0
    for rank, doc in enumerate(ranked[:k], start=1):
        if judgements.get(doc, 0) > 0:
            reciprocal_rank = 1.0 / rank
            break
    relevant = [doc for doc, grade in judgements.items() if grade > 0]
    found = sum(1 for doc in ranked[:k] if judgements.get(doc, 0) > 0)
    dcg = sum(judgements.get(doc, 0) / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], start=1))
    ideal = sorted((judgements[doc] for doc in relevant), reverse=True)[:k]
    idcg = sum(grade / math.log2(rank + 1) for rank, grade in enumerate(ideal, start=1))
    return {"mrr": reciprocal_rank, "recall": found / len(relevant), "ndcg": dcg / idcg}


def _mean_reference(rankings, judgements_list, ks):
    out = {}
    for k in ks:
        per_query = [_reference(r, j, k) for r, j in zip(rankings, judgements_list)]
        for name in ("mrr", "recall", "ndcg"):
            out[f"{name}@{k}"] = sum(m[name] for m in per_query) / len(per_query)
    return out


def test_metrics_match_an_independent_reference():
    rng = np.random.default_rng(7)
    docs = [f"doc{i}" for i in range(60)]
    run, qrels = {}, {}
    for q in range(40):
        judged = rng.choice(docs, size=rng.integers(1, 12), replace=False)
        grades = {d: int(g) for d, g in zip(judged, rng.integers(0, 4, size=len(judged)))}
        grades[judged[0]] = max(grades[judged[0]], 1)
        qrels[f"q{q}"] = grades
        run[f"q{q}"] = list(rng.choice(docs, size=rng.integers(0, 25), replace=False))
    ks = (1, 3, 10, 100)
    got = metrics.search_metrics(run, qrels, ks=ks, corpus_ids=docs)
    want = _mean_reference(list(run.values()), list(qrels.values()), ks)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name

    scores_list, relevance_list, rankings, judgements = [], [], [], []
    for _ in range(40):
        n = int(rng.integers(2, 30))
        scores = rng.integers(0, 5, size=n).astype(float)  # few distinct values: many ties
        relevance = rng.integers(0, 3, size=n)
        relevance[rng.integers(n)] = 2
        scores_list.append(scores)
        relevance_list.append(relevance)
        # Reference tie rule written independently: among equal scores, the less relevant first.
        rankings.append(sorted(range(n), key=lambda i: (-scores[i], relevance[i])))
        judgements.append({i: int(g) for i, g in enumerate(relevance)})
    got = metrics.rerank_metrics(scores_list, relevance_list, ks=ks)
    want = _mean_reference(rankings, judgements, ks)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


def test_metric_errors_name_what_is_wrong():
    qrels = {"q1": {"d1": 1}}
    with pytest.raises(ValueError, match="query 'q2' was searched but has no judgements"):
        metrics.search_metrics({"q1": ["d1"], "q2": ["d1"]}, qrels)
    with pytest.raises(ValueError, match="query 'q1' has judgements in qrels but was not searched"):
        metrics.search_metrics({"q0": ["d1"]}, {**qrels, "q0": {"d1": 1}})
    with pytest.raises(ValueError, match="qrels names document 'd1', which is not in the corpus"):
        metrics.search_metrics({"q1": ["d2"]}, qrels, corpus_ids=["d2", "d3"])
    with pytest.raises(ValueError, match="the ranking names document 'd7', which is not in the corpus"):
        metrics.search_metrics({"q1": ["d7"]}, qrels, corpus_ids=["d1"])
    with pytest.raises(ValueError, match="lists a document twice"):
        metrics.search_metrics({"q1": ["d1", "d1"]}, qrels)
    with pytest.raises(ValueError, match="at least one relevant document"):
        metrics.search_metrics({"q1": ["d1"]}, {"q1": {"d1": 0}})
    with pytest.raises(ValueError, match="query 1: no relevant candidate"):
        metrics.rerank_metrics([np.ones(2), np.ones(2)], [[1, 0], [0, 0]])
    with pytest.raises(ValueError, match="query 0: 3 scores but 2 relevance grades"):
        metrics.rerank_metrics([np.ones(3)], [[1, 0]])
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.rerank_metrics([np.array([np.nan, 1.0])], [[1, 0]])


def test_answer_matching_is_squad_normalised():
    assert metrics.normalize_answer("  The Eiffel-Tower, in  PARIS! ") == "eiffeltower in paris"
    assert metrics.contains_answer("I think it is the city of Paris.", ["paris"])
    assert not metrics.contains_answer("Parisian food", ["Paris"])  # whole words only
    assert metrics.contains_answer("an apple", ["Apple", "pear"])
    assert not metrics.contains_answer("anything", ["", "  "])  # an empty answer never matches
    assert metrics.exact_match("Yes.", ["yes"]) and not metrics.exact_match("Yes, it is", ["yes"])


# ----------------------------------------------------------------------------- examples

def _examples(toy_dir, task, n):
    reader = records.read_jsonl(toy_dir / f"{task}.json")
    return [evaluate.example_from_record(r, icl_holdout=True) for r in itertools.islice(reader, n)]


def test_examples_from_toy_records(toy_dir):
    icl = _examples(toy_dir, "icl", 2)[0]
    raw = json.loads((toy_dir / "icl.json").read_text().splitlines()[0])
    # The toy icl query has no output; the first positive ("input\noutput") is held out instead.
    assert icl.answers == ("No",) and raw["pos"][0] == icl.query + "\nNo"
    assert icl.candidates == tuple(raw["pos"][1:] + raw["neg"]) and icl.relevance[:2] == (1, 1)
    chat = _examples(toy_dir, "chat", 1)[0]
    assert chat.candidates[0].startswith("Speaker 1:") and chat.answers[0].startswith("No, I have")
    lrlm = _examples(toy_dir, "lrlm", 1)[0]
    assert len(lrlm.candidates) == 64 and not any(lrlm.relevance)
    with pytest.raises(ValueError, match=r"icl\.json:1: field 'answers': missing, .* set icl_holdout"):
        evaluate.example_from_record(next(iter(records.read_jsonl(toy_dir / "icl.json"))))
    # A query that carries its output after a newline needs no holdout.
    record = dict(next(iter(records.read_jsonl(toy_dir / "icl.json"))), query="2+2?\n4")
    assert evaluate.example_from_record(record).answers == ("4",)


# ----------------------------------------------------------------------------- downstream, with the LLM

@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    from llm_embedder_jax.llm import RewardLM
    return RewardLM.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from llm_embedder_jax import Embedder
    return search.EmbedderRetriever(Embedder.from_pretrained(minilm_dir), name="minilm", instructions=False,
                                    fingerprint="minilm", batch_size=64, max_length=64)


OPTIONS = evaluate.LMOptions(key_max_tokens=96, max_new_tokens=4, batch_size=4)


class Fixed(search.Retriever):
    """Retrieves given texts: the corpus index of texts[i] for query i."""

    def __init__(self, texts):
        self.texts = texts

    def search(self, queries, corpus, *, task, k):
        return [np.array([list(corpus).index(t)]) for t in self.texts]


class LongestFirst(search.Retriever):
    """Ranks the longest key first, and keeps the keys it was given."""

    def rank(self, queries, candidates_per_query, *, task):
        self.keys = candidates_per_query
        return [np.argsort([-len(key) for key in keys], kind="stable") for keys in candidates_per_query]


def test_lrlm_ranks_chunks_with_their_continuation_when_asked(lm):
    chunks = ["class Box:\n", "    width = 2\n    height = 3\n    depth = 4\n", "    x = 1\n"]
    example = evaluate.example_from_record(records.validate_record(
        {"task": "lrlm", "query": "    def area(self):\n", "answers": ["        return self.width * self.height\n"],
         "pos": [], "neg": chunks, "context": ""}, where="t:1"))
    got = {}
    for joined in (False, True):
        retriever = LongestFirst()
        options = evaluate.LMOptions(key_max_tokens=96, batch_size=4, per_example=True, key_with_continuation=joined)
        got[joined] = evaluate.evaluate_lrlm([example], retriever, lm, k=1, options=options)["logliks"][0]
        assert retriever.keys == [tasks.keys_with_continuation(chunks) if joined else chunks]
    # Plain keys pick chunk 1 (the longest), joined ones chunk 0 (chunks 0+1 the longest pair):
    # the prompt is the picked chunk and the one after it.
    expected = {joined: lm.loglik([rewards.reward_prompt("lrlm", query=example.query, key=chunks[i] + chunks[i + 1])],
                                  [example.answers[0]])[0] for joined, i in ((False, 1), (True, 0))}
    for joined in (False, True):
        assert math.isclose(got[joined], expected[joined], abs_tol=1e-5)
    assert got[False] != got[True]


class Recorded(search.Retriever):
    def __init__(self, name, trained_joined):
        self.name, self.lrlm_key_with_continuation = name, trained_joined


def test_lrlm_keys_follow_what_the_encoders_were_trained_on(caplog):
    joined, plain, unknown = Recorded("a", True), Recorded("b", False), Recorded("bm25", None)
    assert evaluate.lrlm_keys("auto", [joined, unknown]) is True
    assert evaluate.lrlm_keys("auto", [plain, unknown]) is False
    assert evaluate.lrlm_keys("auto", [unknown]) is False  # nothing recorded: plain chunks
    with pytest.raises(ValueError, match=r"different lrlm keys \(\{'a': True, 'b': False\}"):
        evaluate.lrlm_keys("auto", [joined, plain])
    assert evaluate.lrlm_keys("false", [joined, plain]) is False  # set: every row alike
    assert "retriever a was trained on lrlm keys with their continuation; evaluated without it" in caplog.text
    assert "retriever b" not in caplog.text
    assert evaluate.lrlm_keys(True, [joined]) is True
    with pytest.raises(ValueError, match="'auto', 'true' or 'false', got 'yes'"):
        evaluate.lrlm_keys("yes", [joined])


def test_exports_record_their_lrlm_keys_for_retrievers(minilm, minilm_dir, tmp_path):
    from llm_embedder_jax import export
    config = _config(pathlib.Path("."), tmp_path)
    assert search.build_retriever("minilm", config, mesh=None).lrlm_key_with_continuation is None
    minilm.embedder.save_pretrained(tmp_path / "joined", training={"lrlm_key_with_continuation": True})
    assert export.recorded_lrlm_keys(tmp_path / "joined") is True
    assert search.build_retriever(f"mine={tmp_path / 'joined'}", config, mesh=None).lrlm_key_with_continuation is True


def test_qa_positive_passage_beats_a_negative(toy_dir, lm):
    examples = _examples(toy_dir, "qa", 3)
    rng = np.random.default_rng(0)
    positives = [ex.candidates[0] for ex in examples]
    negatives = [ex.candidates[int(rng.integers(1, len(ex.candidates)))] for ex in examples]
    with_pos = evaluate.evaluate_qa(examples, Fixed(positives), lm, k=1, ks=(1,), options=OPTIONS)
    with_neg = evaluate.evaluate_qa(examples, Fixed(negatives), lm, k=1, ks=(1,), options=OPTIONS)
    assert with_pos["mrr@1"] == 1.0 and with_neg["mrr@1"] == 0.0
    assert with_pos["answer_loglik"] > with_neg["answer_loglik"]
    assert 1 < with_pos["answer_perplexity"] < with_neg["answer_perplexity"] < np.inf


@pytest.mark.parametrize("task", ["qa", "icl", "lrlm", "chat"])
def test_llm_evaluations_on_toy_records(toy_dir, lm, minilm, task):
    examples = _examples(toy_dir, task, 2)
    got = {r.name: evaluate.evaluate_task(examples, r, lm, k=2, ks=(1, 5), options=OPTIONS)
           for r in (minilm, search.NoRetriever(), search.RecencyRetriever()) if r.applies_to(task)}
    for name, m in got.items():
        assert all(np.isfinite(v) for v in m.values()), (name, m)
        perplexity = m.get("perplexity", m.get("answer_perplexity"))
        assert 1 < perplexity < 1e4, (name, m)
        assert math.isclose(perplexity, math.exp(-m.get("loglik", m.get("answer_loglik"))), rel_tol=1e-6)
        if "accuracy" in m:
            assert 0 <= m["accuracy"] <= 1
    # Retrieval changes the prompt, hence the likelihood.
    assert got["minilm"] != got["none"]
    if task == "icl":
        # Retrieved demonstrations show the answer format: the one-word answers get likelier.
        assert got["minilm"]["answer_perplexity"] < got["none"]["answer_perplexity"]
    if task == "qa":
        assert got["none"]["recall@5"] == 0.0 and 0 <= got["minilm"]["recall@5"] <= 1
    if task in ("lrlm", "chat"):
        assert got["recency"] != got["none"]


@pytest.mark.parametrize("task", ["tool", "convsearch"])
def test_search_evaluations_on_toy_records(toy_dir, minilm, task):
    examples = _examples(toy_dir, task, 3)
    got = evaluate.evaluate_task(examples, minilm, None, k=1, ks=(1, 10), options=OPTIONS)
    assert all(0 <= v <= 1 for v in got.values())
    assert got["recall@10"] >= got["recall@1"] and got["mrr@10"] >= got["mrr@1"]
    # Far better than chance among the ~100 distinct texts of three records.
    assert got["ndcg@10"] > 0.3


# ----------------------------------------------------------------------------- the eval mode

def _config(toy_dir, workdir, **overrides):
    spec = importlib.util.spec_from_file_location("eval_config", ROOT / "configs" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("toy")
    config.files = (str(toy_dir / "chat.json"), str(toy_dir / "tool.json"))
    config.max_records = 2
    config.retrievers = ("minilm", "lexical=bm25", "none", "recency")
    config.embed.max_length = 64
    config.search.chunk_size = 16
    config.batch_size = 4
    config.key_max_tokens = 64
    config.update(overrides)
    return config


def test_run_eval_writes_report_chart_and_table(toy_dir, lm, tmp_path, capsys):
    report = evaluate.run_eval(_config(toy_dir, tmp_path), tmp_path, lm=lm)
    table = capsys.readouterr().out
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["retrievers"] == ["minilm", "lexical", "none", "recency"]
    assert saved["lrlm_key_with_continuation"] is False  # "auto", and no export says otherwise
    chat, tool = saved["evaluations"]["chat"], saved["evaluations"]["tool"]
    assert chat["records"] == 2 and chat["task"] == "chat" and chat["headline"] == ["perplexity"]
    assert set(chat["results"]) == set(saved["retrievers"])
    assert "not_applicable" in tool["results"]["none"] and "not_applicable" in tool["results"]["recency"]
    assert 0 <= tool["results"]["minilm"]["ndcg@10"] <= 1 and chat["results"]["recency"]["perplexity"] > 1
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| retriever | chat perplexity | tool ndcg@10 | tool mrr@10 |" in table
    assert f"| lexical | {chat['results']['lexical']['perplexity']:.3f} |" in table
    assert "| recency |" in table and "| – | – |" in table
    cached = sorted((tmp_path / "embedding_cache").glob("*.npy"))
    assert len(cached) == 1  # the tool corpus, encoded by minilm
    # A second run reads that cache and gives the same report.
    stamp = cached[0].stat().st_mtime_ns
    assert evaluate.run_eval(_config(toy_dir, tmp_path), tmp_path, lm=lm) == report
    assert cached[0].stat().st_mtime_ns == stamp


def test_eval_mode_from_the_command_line(toy_dir, tmp_path):
    # Retrieval-only: no LLM is loaded.
    result = subprocess.run(
        [sys.executable, "main.py", "--mode=eval", "--config=configs/eval.py:toy", f"--workdir={tmp_path}",
         f"--config.files=('{toy_dir / 'tool.json'}',)", "--config.retrievers=('bm25',)", "--config.max_records=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["evaluations"]["tool"]["records"] == 3
    assert 0 < report["evaluations"]["tool"]["results"]["bm25"]["ndcg@10"] <= 1
    assert "| bm25 |" in result.stdout


def test_bad_input_is_named(toy_dir, tmp_path):
    bad = tmp_path / "qa.jsonl"
    lines = (toy_dir / "qa.json").read_text().splitlines()[:2]
    broken = json.loads(lines[1])
    broken["query"] = ""
    bad.write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(ValueError, match=r"qa\.jsonl:2: field 'query': expected a non-empty string"):
        evaluate.run_eval(_config(toy_dir, tmp_path, files=(str(bad),)), tmp_path)
    # Counted, when the config allows skipping: tool records need positives.
    tool = tmp_path / "tool.jsonl"
    lines = (toy_dir / "tool.json").read_text().splitlines()[:3]
    no_pos = dict(json.loads(lines[2]), pos=[])
    tool.write_text("\n".join([lines[0], "{not json", lines[1], json.dumps(no_pos)]) + "\n")
    with pytest.raises(ValueError, match=r"tool\.jsonl:2: malformed JSON"):
        evaluate.run_eval(_config(toy_dir, tmp_path, files=(str(tool),), retrievers=("bm25",), max_records=0), tmp_path)
    (tmp_path / "no_pos.jsonl").write_text(lines[0] + "\n" + json.dumps(no_pos) + "\n")
    with pytest.raises(ValueError, match=r"no_pos\.jsonl:2: field 'pos': task tool is judged against the positives"):
        evaluate.run_eval(_config(toy_dir, tmp_path, files=(str(tmp_path / "no_pos.jsonl"),)), tmp_path)
    report = evaluate.run_eval(_config(toy_dir, tmp_path, files=(str(tool),), retrievers=("bm25",), max_records=0,
                                       skip_bad_records=True), tmp_path)
    assert report["evaluations"]["tool"]["records"] == 2 and report["evaluations"]["tool"]["skipped_records"] == 2
    (tmp_path / "eval.json").unlink()
    # A corpus that lacks a record's positive.
    examples = _examples(toy_dir, "tool", 2)
    corpus = [t for ex in examples for t in ex.candidates if t != examples[1].candidates[0]]
    with pytest.raises(ValueError, match=r"tool\.json:2: field 'pos': pos\[0\] is not in the corpus"):
        evaluate.evaluate_task(examples, search.BM25Retriever(), None, k=1, ks=(1,), options=OPTIONS, corpus=corpus)
    with pytest.raises(ValueError, match="corpora entry 'tool': expected '<task>=<file>'"):
        evaluate.run_eval(_config(toy_dir, tmp_path, corpora=("tool",)), tmp_path)
    with pytest.raises(ValueError, match="retriever names must differ"):
        evaluate.run_eval(_config(toy_dir, tmp_path, retrievers=("bm25", "bm25")), tmp_path)
    assert not (tmp_path / "eval.json").exists()
