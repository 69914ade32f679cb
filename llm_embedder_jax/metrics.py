"""Retrieval metrics and answer matching, in plain numpy.

MRR@k, Recall@k and NDCG@k with graded relevance (linear gain, log2 discount,
as trec_eval), for a search over a corpus (`search_metrics`) and for reranking
each query's own candidates (`rerank_metrics`). Tied scores rank the less
relevant candidate first: a model earns no credit for a tie. Answers match
after SQuAD normalisation.
"""
import re
import string

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)


def _ranking_metrics(ranked_grades, relevant_grades, ks):
    """Metrics of one ranking: grades of the ranked items (0 = not relevant), grades of every relevant item."""
    ranked = np.asarray(ranked_grades, np.float64)
    ideal = np.sort(np.asarray(relevant_grades, np.float64))[::-1]
    discount = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    hits = np.flatnonzero(ranked > 0)
    metrics = {}
    for k in ks:
        top = ranked[:k]
        metrics[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits.size and hits[0] < k else 0.0
        metrics[f"recall@{k}"] = float((top > 0).sum() / len(ideal))
        ideal_dcg = (ideal[:k] * discount[:min(k, len(ideal))]).sum()
        metrics[f"ndcg@{k}"] = float((top * discount[:len(top)]).sum() / ideal_dcg)
    return metrics


def _mean_metrics(per_query):
    return {name: float(np.mean([m[name] for m in per_query])) for name in per_query[0]}


def check_ks(ks):
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    return ks


def rerank_metrics(scores_list, relevance_list, ks=(1, 5, 10)):
    """Mean MRR@k, Recall@k, NDCG@k of ranking each query's candidates by score.

    scores_list[i], relevance_list[i]: arrays [n_candidates_i]; relevance is a
    grade >= 0 (0 = not relevant) and every query needs one relevant candidate.
    """
    ks = check_ks(ks)
    if len(scores_list) != len(relevance_list):
        raise ValueError(f"{len(scores_list)} score arrays but {len(relevance_list)} relevance arrays")
    if not len(scores_list):
        raise ValueError("no queries to evaluate")
    per_query = []
    for i, (scores, relevance) in enumerate(zip(scores_list, relevance_list)):
        scores, relevance = np.asarray(scores, np.float64).ravel(), np.asarray(relevance, np.float64).ravel()
        if scores.shape != relevance.shape:
            raise ValueError(f"query {i}: {scores.size} scores but {relevance.size} relevance grades")
        if not np.isfinite(scores).all():
            raise ValueError(f"query {i}: the scores contain NaN or Inf")
        if (relevance < 0).any() or not np.isfinite(relevance).all():
            raise ValueError(f"query {i}: relevance grades must be finite and >= 0")
        if not (relevance > 0).any():
            raise ValueError(f"query {i}: no relevant candidate (every grade is 0): its metrics are undefined")
        order = np.lexsort((relevance, -scores))  # by score, ties: less relevant first
        per_query.append(_ranking_metrics(relevance[order], relevance[relevance > 0], ks))
    return _mean_metrics(per_query)


def search_metrics(run, qrels, *, ks=(1, 5, 10), corpus_ids=None):
    """Mean MRR@k, Recall@k, NDCG@k of a search.

    run: {query id: ranked document ids, best first}; qrels: {query id: {document
    id: grade}}, grade >= 0. Every searched query needs judgements with one
    grade > 0; `corpus_ids`, when given, must hold every document of both.
    """
    ks = check_ks(ks)
    if not run:
        raise ValueError("the run is empty: no query was searched")
    corpus = None if corpus_ids is None else set(corpus_ids)
    missing = [q for q in qrels if q not in run]
    if missing:
        raise ValueError(f"query {missing[0]!r} has judgements in qrels but was not searched")
    per_query = []
    for query, ranked in run.items():
        if query not in qrels:
            raise ValueError(f"query {query!r} was searched but has no judgements in qrels")
        grades = qrels[query]
        if any(g < 0 for g in grades.values()) or not any(g > 0 for g in grades.values()):
            raise ValueError(f"query {query!r}: qrels need grades >= 0 and at least one relevant document (> 0)")
        ranked = list(ranked)
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"query {query!r}: the ranking lists a document twice")
        if corpus is not None:
            for doc in (*grades, *ranked):
                if doc not in corpus:
                    where = "qrels" if doc in grades else "the ranking"
                    raise ValueError(f"query {query!r}: {where} names document {doc!r}, which is not in the corpus")
        per_query.append(_ranking_metrics([grades.get(d, 0) for d in ranked],
                                          [g for g in grades.values() if g > 0], ks))
    return _mean_metrics(per_query)


def normalize_answer(text):
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def contains_answer(output, answers):
    """Some answer occurs in the output, on word boundaries, after normalisation."""
    output = f" {normalize_answer(output)} "
    return any(normalize_answer(a) and f" {normalize_answer(a)} " in output for a in answers)


def exact_match(output, answers):
    return any(normalize_answer(output) == normalize_answer(a) for a in answers)
