"""What retrieval does for the LLM: the downstream evaluations and `--mode=eval`.

  python main.py --mode=eval --config=configs/eval.py:toy --workdir=runs/eval

One evaluation per task, following the LLM-Embedder protocol (retrieved → measured):

- qa: top-k passages searched in a corpus (the records' pos + neg, or `corpora`) →
  gold answer in the greedy output (SQuAD normalisation), answer perplexity,
  MRR / Recall / NDCG of the search;
- icl: top-k examples among the record's pos + neg → exact match of the output's
  first line, answer perplexity;
- lrlm: top-k earlier chunks, each with the chunk after it → perplexity of the next chunk;
- chat: top-k history turns → perplexity of the response;
- tool, convsearch: a corpus search as for qa → MRR / Recall / NDCG (relevant = pos).

Prompts are the reward prompts of `tasks.REWARD_TEMPLATES` with the retrieved
texts as the key (joined by newlines; lrlm chunks by nothing, as they are cuts
of one text), or the prompt without a key for the `none` retriever. Perplexity
is exp(−mean over records of the mean answer-token log-likelihood).

`rerank_metrics` (from `metrics`) is also the training loop's periodic eval.
"""
import dataclasses
import itertools
import json
import logging
import pathlib

import jax
import numpy as np

from llm_embedder_jax import atomic, paths, rewards, search, tasks
from llm_embedder_jax.metrics import check_ks, contains_answer, exact_match, rerank_metrics, search_metrics

__all__ = ["rerank_metrics", "run_eval", "evaluate_task", "example_from_record"]

LM_TASKS = ("qa", "icl", "lrlm", "chat")
SEARCH_TASKS = ("qa", "tool", "convsearch")


# ----------------------------------------------------------------------------- examples

@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation query: its candidates (in record order), their relevance, its desired outputs."""
    task: str
    query: str
    candidates: tuple
    relevance: tuple
    answers: tuple
    context: str
    source: str


def example_from_record(record, *, icl_holdout=False):
    """An `Example` of a record of `data.records.read_jsonl`.

    icl: the answer is the record's `answers`, else the text after the query's last
    newline. Training-format icl records (the toy icl.json) have neither — their
    query is an input without its output, while every candidate is "input\\noutput" —
    so `icl_holdout` makes the first positive the query (its output the answer) and
    the other candidates its pool.
    """
    task, where = record["task"], record["source"]
    if task == "chat":
        candidates, relevance = list(record["history"]), [0] * len(record["history"])
    else:
        candidates, relevance = record["pos"] + record["neg"], [1] * len(record["pos"]) + [0] * len(record["neg"])
    query, answers = record["query"], list(record["answers"] or [])
    if task == "icl" and not answers:
        if "\n" in query.strip():
            query, answer = query.strip().rsplit("\n", 1)
            answers = [answer]
        elif icl_holdout and record["pos"] and "\n" in record["pos"][0].strip():
            query, answer = record["pos"][0].strip().rsplit("\n", 1)
            answers, candidates, relevance = [answer], candidates[1:], relevance[1:]
        else:
            raise ValueError(f"{where}: field 'answers': missing, and the query has no '\\n<answer>' to split; "
                             "set icl_holdout to hold out the first positive (an 'input\\noutput' example) instead")
    if task in LM_TASKS and not any(a.strip() for a in answers):
        raise ValueError(f"{where}: field 'answers': task {task} needs a non-empty desired output")
    if task in SEARCH_TASKS and not any(relevance):
        raise ValueError(f"{where}: field 'pos': task {task} is judged against the positives, and there are none")
    if not candidates:
        raise ValueError(f"{where}: no candidates left to retrieve from")
    return Example(task=task, query=query, candidates=tuple(candidates), relevance=tuple(relevance),
                   answers=tuple(a for a in answers if a.strip()), context=record.get("context") or "",
                   source=where)


# ----------------------------------------------------------------------------- evaluations

@dataclasses.dataclass(frozen=True)
class LMOptions:
    """How the reward LLM is prompted and run."""
    key_max_tokens: int = 256  # each retrieved text is cut to this many LLM tokens (0 = no cut)
    max_new_tokens: int = 32  # greedy output length for qa and icl
    batch_size: int = 16
    max_length: int = 0  # prompt + answer tokens (0 = the LLM's own context)
    per_example: bool = False  # also return each example's answer log-likelihood ("logliks"), for paired statistics
    key_with_continuation: bool = False  # lrlm: rank each chunk joined with the one after it (tasks.py)


def build_corpus(examples, corpus=None):
    """(corpus texts, qrels {example index: {corpus index: 1}}) with the positives as relevant.

    Without `corpus`, the corpus is every distinct pos and neg text of the examples,
    sorted, so that corpus order (which breaks score ties) says nothing of relevance.
    """
    texts = list(corpus) if corpus is not None else sorted({t for ex in examples for t in ex.candidates})
    if not texts:
        raise ValueError("the corpus is empty")
    index = {t: i for i, t in enumerate(texts)}
    qrels = {}
    for i, ex in enumerate(examples):
        positives = [t for t, r in zip(ex.candidates, ex.relevance) if r > 0]
        for j, text in enumerate(positives):
            if text not in index:
                raise ValueError(f"{ex.source}: field 'pos': pos[{j}] is not in the corpus ({text[:60]!r}...)")
        qrels[i] = {index[t]: 1 for t in positives}
    return texts, qrels


def _retrieval(examples, retriever, *, ks, depth=0, corpus=None):
    """(ranked corpus ids per example, at least `depth` deep; corpus texts; retrieval metrics)."""
    texts, qrels = build_corpus(examples, corpus)
    ranked = retriever.search([ex.query for ex in examples], texts, task=examples[0].task, k=max(*ks, depth))
    metrics = search_metrics(dict(enumerate(ranked)), qrels, ks=ks, corpus_ids=range(len(texts)))
    return ranked, texts, metrics


def _lm_scores(lm, prompts, answers, options):
    loglik = rewards.loglik_pairs(lm, list(zip(prompts, answers)), batch_size=options.batch_size,
                                  max_length=options.max_length or None)
    mean = float(np.mean(loglik))
    scores = {"loglik": mean, "perplexity": float(np.exp(-mean))}
    if options.per_example:
        scores["logliks"] = [float(v) for v in loglik]
    return scores


def _greedy(lm, prompts, options):
    # Generation starts after "Answer:", not after its trailing space: a BPE model
    # writes the space itself, and a prompt ending in one throws it off.
    outputs = lm.sample([p.rstrip(" ") for p in prompts], n=1, max_new_tokens=options.max_new_tokens,
                        temperature=0.0, batch_size=options.batch_size, max_length=options.max_length or None)
    return [o[0].strip() for o in outputs]


def _shorten(lm, texts, options):
    return rewards.truncate_to_tokens(texts, lm.tokenizer, max_tokens=options.key_max_tokens)


def evaluate_qa(examples, retriever, lm, *, k, ks, options, corpus=None):
    ranked, texts, metrics = _retrieval(examples, retriever, ks=ks, depth=k, corpus=corpus)
    prompts = []
    for ex, ids in zip(examples, ranked):
        passages = _shorten(lm, [texts[i] for i in ids[:k]], options)
        prompts.append(rewards.reward_prompt("qa", query=ex.query, key="\n".join(passages) if passages else None))
    outputs = _greedy(lm, prompts, options)
    metrics["accuracy"] = float(np.mean([contains_answer(o, ex.answers) for o, ex in zip(outputs, examples)]))
    answer = _lm_scores(lm, prompts, [ex.answers[0] for ex in examples], options)
    metrics.update(answer_loglik=answer["loglik"], answer_perplexity=answer["perplexity"])
    return metrics


def evaluate_search(examples, retriever, *, ks, corpus=None):
    """tool, convsearch: how well the positives are found in the corpus."""
    return _retrieval(examples, retriever, ks=ks, corpus=corpus)[2]


def _top(examples, retriever, k, keys=None):
    """The top-k candidate indices per example, ranked over `keys` (default: the candidate texts)."""
    keys = keys or [list(ex.candidates) for ex in examples]
    ranked = retriever.rank([ex.query for ex in examples], keys, task=examples[0].task)
    return [np.asarray(r[:k], np.int64) for r in ranked]


def evaluate_icl(examples, retriever, lm, *, k, options):
    prompts = []
    for ex, top in zip(examples, _top(examples, retriever, k)):
        demos = _shorten(lm, [ex.candidates[i] for i in top], options)  # best first
        prompts.append(rewards.reward_prompt("icl", query=ex.query, key="\n".join(demos) if demos else None))
    outputs = _greedy(lm, prompts, options)
    first_lines = [o.split("\n")[0] for o in outputs]
    answer = _lm_scores(lm, prompts, [ex.answers[0] for ex in examples], options)
    return {"accuracy": float(np.mean([exact_match(o, ex.answers) for o, ex in zip(first_lines, examples)])),
            "answer_loglik": answer["loglik"], "answer_perplexity": answer["perplexity"]}


def evaluate_lrlm(examples, retriever, lm, *, k, options):
    keys = [tasks.keys_with_continuation(ex.candidates) for ex in examples] if options.key_with_continuation else None
    prompts = []
    for ex, top in zip(examples, _top(examples, retriever, k, keys)):
        # Each retrieved chunk brings the chunk after it (the released self-retrieval
        # setting); together they stay in the order of the history.
        chosen = sorted({j for i in top for j in (i, i + 1) if j < len(ex.candidates)})
        chunks = _shorten(lm, [ex.candidates[j] for j in chosen], options)
        prompts.append(rewards.reward_prompt("lrlm", query=ex.query, context=ex.context,
                                             key="".join(chunks) if chunks else None))
    return _lm_scores(lm, prompts, [ex.answers[0] for ex in examples], options)


def evaluate_chat(examples, retriever, lm, *, k, options):
    prompts = []
    for ex, top in zip(examples, _top(examples, retriever, k)):
        turns = _shorten(lm, [ex.candidates[j] for j in sorted(top)], options)  # in the order they were said
        prompts.append(rewards.reward_prompt("chat", query=ex.query, key="\n".join(turns) if turns else None))
    return _lm_scores(lm, prompts, [ex.answers[0] for ex in examples], options)


def evaluate_task(examples, retriever, lm, *, k, ks, options, corpus=None):
    """The metrics of `retriever` on examples of one task."""
    if not examples:
        raise ValueError("no examples to evaluate")
    task = examples[0].task
    if any(ex.task != task for ex in examples):
        raise ValueError(f"examples of several tasks: {sorted({ex.task for ex in examples})}; evaluate one at a time")
    if task in ("tool", "convsearch"):
        return evaluate_search(examples, retriever, ks=ks, corpus=corpus)
    if task == "qa":
        return evaluate_qa(examples, retriever, lm, k=k, ks=ks, options=options, corpus=corpus)
    return {"icl": evaluate_icl, "lrlm": evaluate_lrlm, "chat": evaluate_chat}[task](
        examples, retriever, lm, k=k, options=options)


# ----------------------------------------------------------------------------- the eval mode

def read_examples(path, config):
    """({task: [Example]}, number of skipped records) of one JSONL file's first `max_records` records.

    A bad record stops the run, naming file, line and field, unless `skip_bad_records`
    counts it instead.
    """
    from llm_embedder_jax.data import records
    reader = records.read_jsonl(path, task=config.task or None, skip_bad=config.skip_bad_records)
    grouped, unusable = {}, 0
    for record in itertools.islice(reader, config.max_records or None):
        try:
            example = example_from_record(record, icl_holdout=config.icl_holdout)
        except ValueError as e:
            if not config.skip_bad_records:
                raise
            logging.warning("skipping %s", e)
            unusable += 1
            continue
        grouped.setdefault(record["task"], []).append(example)
    if not grouped:
        raise ValueError(f"{path}: no usable records")
    return grouped, unusable + sum(reader.skipped.values())


def read_corpora(specs):
    """{task: corpus texts} from "task=file" entries (.txt: one text a line; .jsonl: field "text")."""
    from llm_embedder_jax.export import read_texts
    corpora = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep or task not in SEARCH_TASKS:
            raise ValueError(f"corpora entry {spec!r}: expected '<task>=<file>' with task one of "
                             f"{', '.join(SEARCH_TASKS)}")
        corpora[task] = read_texts(path, field="text")
        if not corpora[task]:
            raise ValueError(f"corpora entry {spec!r}: {path} holds no texts")
    return corpora


def headline_metrics(task, ks):
    """The metrics a table and chart show for `task` (perplexities: lower is better)."""
    top = max(ks)
    return {"qa": ("accuracy", "answer_perplexity", f"recall@{top}"), "icl": ("accuracy", "answer_perplexity"),
            "lrlm": ("perplexity",), "chat": ("perplexity",)}.get(task, (f"ndcg@{top}", f"mrr@{top}"))


def format_table(report):
    """A markdown table: one row per retriever, one column per (evaluation, metric)."""
    columns = [(key, metric) for key, entry in report["evaluations"].items()
               for metric in headline_metrics(entry["task"], report["ks"])]
    lines = ["| retriever | " + " | ".join(f"{key} {metric}" for key, metric in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in report["retrievers"]:
        cells = []
        for key, metric in columns:
            value = report["evaluations"][key]["results"][name].get(metric)
            cells.append("–" if value is None else f"{value:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(report, path):
    """One panel per column of the table, one bar per retriever; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(key, entry, metric) for key, entry in report["evaluations"].items()
              for metric in headline_metrics(entry["task"], report["ks"])]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, entry, metric) in zip(axes.flat, panels):
        names = [n for n in report["retrievers"] if metric in entry["results"][n]]
        values = [entry["results"][n][metric] for n in names]
        ax.bar(names, values, color=[f"C{report['retrievers'].index(n)}" for n in names])
        ax.set_ylim(0, 1.15 * max(values, default=0) or 1)
        ax.set_title(f"{key}: {metric} {'↓' if 'perplexity' in metric else '↑'}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def check_config(config):
    if not config.files:
        raise ValueError("no files: set config.files to the JSONL files to evaluate on")
    if not config.retrievers:
        raise ValueError("no retrievers: set config.retrievers")
    check_ks(config.ks)
    for task in LM_TASKS:
        if config.k[task] < 1:
            raise ValueError(f"k.{task} must be >= 1, got {config.k[task]}")
    if config.search.backend not in search.BACKENDS:
        raise ValueError(f"unknown search backend {config.search.backend!r}: "
                         f"expected one of {', '.join(search.BACKENDS)}")


def lrlm_keys(setting, retrievers):
    """Whether lrlm candidates are ranked joined with their continuation, for every retriever alike.

    "auto": as the retrievers' encoders were trained (recorded in their exports), else plain chunks;
    "true" / "false" (or a bool): as set, with a warning for an encoder trained the other way.
    """
    setting = {"true": True, "false": False}.get(str(setting).lower(), setting)
    recorded = {r.name: r.lrlm_key_with_continuation for r in retrievers
                if r.lrlm_key_with_continuation is not None}
    if setting == "auto":
        if len(set(recorded.values())) > 1:
            raise ValueError(f"key_with_continuation='auto', but the retrievers were trained on different lrlm keys "
                             f"({recorded}: True = joined with their continuation); set it to 'true' or 'false'")
        return next(iter(recorded.values()), False)
    if setting not in (True, False):
        raise ValueError(f"key_with_continuation must be 'auto', 'true' or 'false', got {setting!r}")
    for name, trained in recorded.items():
        if trained != setting:
            logging.warning("retriever %s was trained on lrlm keys %s their continuation; evaluated %s it "
                            "(config.key_with_continuation=%s)", name, "with" if trained else "without",
                            "with" if setting else "without", setting)
    return setting


def run_eval(config, workdir, *, lm=None):
    """`--mode=eval`: every retriever on every file; writes eval.json and eval.png to `workdir`.

    Inputs are all read and checked before any model is loaded. `lm` replaces the
    configured reward LLM (which is loaded only when a file needs it).
    """
    from llm_embedder_jax import score, sharding, validation
    validation.validate(config, "eval")
    check_config(config)
    workdir = paths.as_path(workdir)
    names = [pathlib.Path(p).stem for p in config.files]
    if len(set(names)) != len(names):
        raise ValueError(f"file names must differ (results are named after them): {', '.join(config.files)}")
    files = {pathlib.Path(p): read_examples(p, config) for p in config.files}
    corpora = read_corpora(config.corpora)
    if not config.search.cache_dir and not paths.is_remote(workdir):  # the cache is memory-mapped: local only
        config = config.copy_and_resolve_references()
        config.search.cache_dir = str(workdir / "embedding_cache")
    mesh = sharding.make_mesh()
    retrievers = [search.build_retriever(spec, config, mesh=mesh) for spec in config.retrievers]
    if len({r.name for r in retrievers}) != len(retrievers):
        raise ValueError(f"retriever names must differ: {[r.name for r in retrievers]} (use '<name>=<spec>')")
    key_with_continuation = lrlm_keys(config.key_with_continuation, retrievers)
    options = LMOptions(key_max_tokens=config.key_max_tokens, max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size, max_length=config.max_length,
                        key_with_continuation=key_with_continuation)
    if lm is None and any(t in LM_TASKS for grouped, _ in files.values() for t in grouped):
        lm = score.load_reward_lm(config)

    report = {"ks": list(check_ks(config.ks)), "k": config.k.to_dict(), "retrievers": [r.name for r in retrievers],
              "lrlm_key_with_continuation": key_with_continuation, "evaluations": {}}
    for path, (grouped, skipped) in files.items():
        for task, examples in grouped.items():
            key = path.stem if len(grouped) == 1 else f"{path.stem}:{task}"
            results = {}
            for retriever in retrievers:
                if not retriever.applies_to(task):
                    results[retriever.name] = {"not_applicable": f"{retriever.name} does not apply to {task}"}
                    continue
                logging.info("evaluating %s on %s (%d records)", retriever.name, key, len(examples))
                results[retriever.name] = evaluate_task(examples, retriever, lm, k=config.k.get(task, 1),
                                                        ks=report["ks"], options=options, corpus=corpora.get(task))
            report["evaluations"][key] = {
                "path": str(path), "task": task, "records": len(examples), "skipped_records": skipped,
                "headline": headline_metrics(task, report["ks"]), "results": results}
    if jax.process_index() == 0:  # every process holds the whole report; one writes it
        print(format_table(report))
        plot_report(report, workdir / "eval.png")
        with atomic.atomic_file(workdir / "eval.json") as f:
            json.dump(report, f, indent=2)
        logging.info("wrote %s and %s", workdir / "eval.json", workdir / "eval.png")
    return report
