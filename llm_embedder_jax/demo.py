"""The demo (`main.py`'s default): score → train → evaluate → export on real source code.

  python main.py --workdir=runs/demo

Stages, each cached in its own folder of the workdir and skipped on a rerun
once done ("skipping <stage>: done"); a stage done under other settings is an
error, not silently reused:

    data/        train.jsonl and test.jsonl: lrlm samples of the source files (data/code_lrlm.py),
                 split by file
    score/       train.jsonl with teacher_scores from the reward LLM (score.py, resumable)
    train/seed_N all-MiniLM-L6-v2 fine-tuned with the lrlm recipe (train.py, resumable); seed 0
                 exports to <workdir>/export, the others to train/seed_N/export
    eval/        one file per row: the LLM's perplexity of the next chunk of every test sample
                 with the top-1 retrieved chunk (and its continuation) in the prompt
    report.json, report.png   every row; trained rows as mean ± std over the training seeds

Each stage's `done.json` keeps its settings and its wall and CPU seconds.
"""
import json
import logging
import pathlib
import time

import numpy as np

from llm_embedder_jax import atomic

TRAINED = "trained"


def _plain(value):
    """A config value as plain JSON data (tuples → lists), for comparing settings."""
    return json.loads(json.dumps(value, default=lambda v: v.to_dict()))


class Stages:
    """Per-stage done markers under the workdir, with the settings and cost of each stage."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        self.timings = {}

    def _marker(self, name):
        return self.workdir / name / "done.json"

    def done(self, name, settings):
        """The stage's recorded outputs when it is done with `settings`; None when it has to run."""
        marker = self._marker(name)
        if not marker.exists():
            return None
        found = json.loads(marker.read_text())
        if found["settings"] != _plain(settings):
            changed = sorted(k for k in set(found["settings"]) | set(_plain(settings))
                             if found["settings"].get(k) != _plain(settings).get(k))
            raise ValueError(f"{marker.parent} was made with other settings ({', '.join(changed)} differ); "
                             f"use another workdir or delete that folder (and the stages after it)")
        logging.info("skipping %s: done", name)
        self.timings[name] = {**found["timing"], "skipped": True}
        return found["outputs"]

    def run(self, name, settings, fn):
        """`fn()`'s outputs (JSON data): read back when done, else computed, timed and recorded."""
        outputs = self.done(name, settings)
        if outputs is not None:
            return outputs
        logging.info("stage %s", name)
        wall, cpu = time.perf_counter(), time.process_time()
        outputs = fn()
        timing = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        self.timings[name] = {**timing, "skipped": False}
        with atomic.atomic_file(self._marker(name)) as f:
            json.dump({"settings": _plain(settings), "outputs": outputs, "timing": timing}, f, indent=1)
        return outputs


def data_settings(config, split):
    from llm_embedder_jax.data import code_lrlm
    caps = config.data[split]
    return code_lrlm.CodeLrlmSettings(
        source=config.data.source, pattern=config.data.pattern, exclude_dirs=tuple(config.data.exclude_dirs),
        chunk_tokens=config.data.chunk_tokens, context_chunks=config.data.context_chunks,
        gap_chunks=config.data.gap_chunks,
        min_candidates=caps.min_candidates, max_candidates=caps.max_candidates,
        max_samples_per_file=caps.max_samples_per_file, max_files=caps.max_files,
        validation_fraction=config.data.validation_fraction, test_fraction=config.data.test_fraction)


def make_data(config, folder):
    from llm_embedder_jax.data import code_lrlm
    tokenizer = code_lrlm.load_chunk_tokenizer(config.data.tokenizer)
    reports = {}
    for split in ("train", "test"):
        reports[split] = code_lrlm.write_jsonl(folder / f"{split}.jsonl", split=split,
                                               settings=data_settings(config, split), tokenizer=tokenizer)
        logging.info("%s split: %d samples from %d files (%d read, %d too short, %d not UTF-8)", split,
                     reports[split]["samples"], reports[split]["files_used"], reports[split]["files_read"],
                     reports[split]["too short"], reports[split]["not UTF-8"])
    return reports


def score_config(config, data_dir):
    score = config.score.copy_and_resolve_references()
    score.inputs = (str(data_dir / "train.jsonl"),)
    score.task = "lrlm"
    return score


def train_config(config, score_dir, seed, export_dir):
    train = config.train.copy_and_resolve_references()
    train.data_dir = str(score_dir)
    train.seed = seed
    train.export_dir = str(export_dir)
    for dataset in train.datasets:
        dataset.settings.key_with_continuation = config.key_with_continuation
    return train


def read_test_examples(path):
    from llm_embedder_jax import evaluate
    from llm_embedder_jax.data import records
    return [evaluate.example_from_record(r) for r in records.read_jsonl(path, task="lrlm", require_answers=True)]


def evaluate_row(spec, *, examples, lm, config, mesh):
    """One row: the metrics of the retriever `spec`, with each test sample's log-likelihood."""
    from llm_embedder_jax import evaluate, search
    retriever = search.build_retriever(spec, config.eval, mesh=mesh)
    options = evaluate.LMOptions(key_max_tokens=config.eval.key_max_tokens, batch_size=config.eval.batch_size,
                                 max_length=config.eval.max_length, per_example=True,
                                 key_with_continuation=evaluate.lrlm_keys(config.key_with_continuation, [retriever]))
    return evaluate.evaluate_task(examples, retriever, lm, k=config.eval.k, ks=(1,), options=options)


def _mean_and_se(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def summarize(rows, *, baseline="untrained"):
    """Every row's perplexity and log-likelihood, with two spreads, and the paired gain of the trained rows.

    rows: {name: [evaluation per seed]} (one evaluation for rows that do not depend on the seed).
    - `std`: over the training seeds (0 for a single evaluation);
    - `ci95`: perplexity interval from the standard error over the test samples of the mean
      log-likelihood (per sample averaged over seeds);
    - `gain_vs_<baseline>`: the trained row's mean log-likelihood minus the baseline's on the same
      samples, per seed, and its standard error over the samples (> 0: the trained encoder helps).
    """
    summary = {}
    for name, per_seed in rows.items():
        ppl = [r["perplexity"] for r in per_seed]
        loglik = [r["loglik"] for r in per_seed]
        mean, se = _mean_and_se(np.mean([r["logliks"] for r in per_seed], axis=0))
        summary[name] = {
            "perplexity": {"mean": float(np.mean(ppl)), "std": float(np.std(ppl)), "values": ppl,
                           "ci95": [float(np.exp(-mean - 1.96 * se)), float(np.exp(-mean + 1.96 * se))]},
            "loglik": {"mean": float(np.mean(loglik)), "std": float(np.std(loglik)), "values": loglik, "se": se}}
    if baseline in rows and TRAINED in rows:
        reference = np.asarray(rows[baseline][0]["logliks"])
        per_seed = [np.asarray(r["logliks"]) - reference for r in rows[TRAINED]]
        per_sample = np.mean(per_seed, axis=0)
        gain, se = _mean_and_se(per_sample)
        summary[TRAINED][f"gain_vs_{baseline}"] = {
            "loglik": gain, "se": se, "per_seed": [float(g.mean()) for g in per_seed],
            "samples_better": float(np.mean(per_sample > 0)), "samples_worse": float(np.mean(per_sample < 0))}
    return summary


def format_table(summary):
    lines = ["| retriever | next-chunk perplexity ↓ | 95% interval (test samples) |", "|---|---:|---:|"]
    for name, entry in summary.items():
        ppl = entry["perplexity"]
        spread = f" ± {ppl['std']:.3f}" if len(ppl["values"]) > 1 else ""
        lines.append(f"| {name} | {ppl['mean']:.3f}{spread} | {ppl['ci95'][0]:.3f}–{ppl['ci95'][1]:.3f} |")
    for key, gain in summary.get(TRAINED, {}).items():
        if key.startswith("gain_vs_"):
            lines.append(f"\n{TRAINED} vs {key[len('gain_vs_'):]}: {gain['loglik']:+.4f} ± {gain['se']:.4f} answer "
                         f"log-likelihood per token (paired, SE over samples); better on "
                         f"{gain['samples_better']:.0%}, worse on {gain['samples_worse']:.0%} of the samples")
    return "\n".join(lines)


def plot_summary(summary, path, *, title):
    """Bar chart of the perplexity per row (error bars: std over seeds), written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(summary)
    means = [summary[n]["perplexity"]["mean"] for n in names]
    stds = [summary[n]["perplexity"]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.4))
    ax.bar(names, means, yerr=stds if any(stds) else None, capsize=4, color=[f"C{i}" for i in range(len(names))])
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(low * 0.97, max(m + s for m, s in zip(means, stds)) * 1.01)
    for x, (m, s) in enumerate(zip(means, stds)):
        ax.annotate(f"{m:.3f}" + (f"±{s:.3f}" if s else ""), (x, m + s), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("next-chunk perplexity ↓")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def run_demo(config, workdir):
    """`main.py --mode=demo`: every stage (skipping those already done); returns the report."""
    from llm_embedder_jax import rewards, score, search, sharding, train, validation

    validation.validate(config, "demo", check_data=False)  # its stages make the data
    if config.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {config.seeds}")
    workdir = pathlib.Path(workdir)
    stages = Stages(workdir)
    data_dir, score_dir = workdir / "data", workdir / "score"
    lm_holder = {}

    def reward_lm():
        if "lm" not in lm_holder:
            lm_holder["lm"] = score.load_reward_lm(config.score)
        return lm_holder["lm"]

    def eval_lm():  # rows that pick the same chunk for a sample share its LLM pass
        if "eval" not in lm_holder:
            lm_holder["eval"] = rewards.LoglikMemo(reward_lm())
        return lm_holder["eval"]

    data_key = _plain(config.data)
    data_report = stages.run("data", data_key, lambda: make_data(config, data_dir))

    scoring = score_config(config, data_dir)
    # Only the train split is scored: a change to the test split leaves the scores and the training.
    train_data_key = {k: v for k, v in data_key.items() if k != "test"}
    # The input paths name the workdir (already keyed by the data settings): a moved workdir stays reusable.
    score_key = {"data": train_data_key, "score": _plain({k: v for k, v in scoring.items()
                                                          if k not in ("workdir", "inputs")})}
    stages.run("score", score_key, lambda: score.score_files(scoring, score_dir, lm=reward_lm()))

    seeds = [config.train.seed + i for i in range(config.seeds)]
    exports = {}
    for i, seed in enumerate(seeds):
        seed_dir = workdir / "train" / f"seed_{seed}"
        export_dir = workdir / "export" if i == 0 else seed_dir / "export"
        training = train_config(config, score_dir, seed, export_dir)
        key = {"score": score_key, "train": _plain({k: v for k, v in training.items()
                                                    if k not in ("workdir", "data_dir", "export_dir")})}
        stages.run(f"train/seed_{seed}", key, lambda: str(train.train_and_evaluate(training, seed_dir)))
        exports[seed] = export_dir

    examples = read_test_examples(data_dir / "test.jsonl")
    mesh = sharding.make_mesh()
    eval_key = {"data": data_key, "eval": _plain(config.eval), "keys": config.key_with_continuation, "llm": _plain(
        {k: config.score[k] for k in ("llm", "dtype")})}
    rows = {}
    for spec in config.eval.retrievers:
        name, _, target = spec.partition("=")
        if not target:
            raise ValueError(f"config.eval.retrievers entry {spec!r}: expected '<name>=<retriever>'")
        rows[name] = [stages.run(f"eval/{name}", eval_key, lambda: evaluate_row(
            target, examples=examples, lm=eval_lm(), config=config, mesh=mesh))]
    rows[TRAINED] = [stages.run(f"eval/{TRAINED}_seed_{seed}", {**eval_key, "model": search.model_fingerprint(exports[seed])},
                                lambda: evaluate_row(f"{TRAINED}={exports[seed]}", examples=examples,
                                                     lm=eval_lm(), config=config, mesh=mesh))
                     for seed in seeds]

    summary = summarize(rows)
    table = format_table(summary)
    print(table)
    report = {"rows": summary, "table": table, "test_samples": len(examples), "seeds": seeds,
              "export": str(exports[seeds[0]]), "data": data_report,
              "stages": stages.timings,
              "total_wall_s": round(sum(t["wall_s"] for t in stages.timings.values() if not t["skipped"]), 1),
              "total_cpu_s": round(sum(t["cpu_s"] for t in stages.timings.values() if not t["skipped"]), 1)}
    with atomic.atomic_file(workdir / "report.json") as f:
        json.dump(report, f, indent=1)
    plot_summary(summary, workdir / "report.png",
                 title=f"{len(examples)} held-out samples of {config.data.source}; "
                       f"± std over {len(seeds)} training seed(s)")
    logging.info("wrote %s and %s", workdir / "report.json", workdir / "report.png")
    return report
