"""The `score` job: teacher scores from a reward LLM for JSONL training data.

  python main.py --mode=score --config=configs/score.py --workdir=runs/score

Each input file gives `workdir/<its file name>`: the same records in the same order,
each with `teacher_scores` aligned with `pos + neg` (`history` for chat) and, for the
rank-aware reward, `teacher_ranks`. `workdir/score_report.json` counts what was
scored and what was skipped (only with `skip_bad_records`; otherwise a bad record
stops the job, before the LLM is loaded, with its file, line and field).

Resumable: the records of a file are cut into shards of `shard_size`, each written
atomically to `workdir/shards/<file stem>/`. A restarted job keeps the finished shards
and the merge yields exactly the output of an uninterrupted run, in input order.

Multi-host: process p scores the records i with i % process_count == p, on its own
devices (a whole copy of the LLM per host, split over the local devices when
`model_parallel` > 1), so hosts never wait on each other; process 0 merges once all
are done (a coordination-service barrier, not a device collective, so a long wait
times out only after `distributed.DEFAULT_BARRIER_TIMEOUT_S`). The workdir must be a
folder every host sees: a shared file system or a bucket (gs://...), and inputs may
be remote too. docs/scaling.md has the recipe for a pod.
"""
import hashlib
import itertools
import json
import os
import pathlib
import time

import numpy as np
from absl import logging
from tqdm import tqdm

from llm_embedder_jax import distributed, jsonl, paths, rewards
from llm_embedder_jax.atomic import atomic_file

# Fields listed in step with a candidate field, cut with it when `max_candidates` applies.
ALIGNED_FIELDS = {"pos": ("pos_index", "pos_scores"), "neg": ("neg_index", "neg_score"), "history": ()}
# Config fields that change the scores: a shard written under other values is not reused.
SCORING_FIELDS = ("task", "llm", "dtype", "reward", "key_max_tokens", "max_length", "max_candidates", "seed", "rank")
MAX_REPORTED_SKIPS = 100


class BadRecord(ValueError):
    def __init__(self, path, line, field, problem):
        where = f"{path}, line {line}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")


def candidate_fields(task):
    return ("history",) if task == "chat" else ("pos", "neg")


def record_lines(path):
    """(ordinal, line number, bytes) of every non-blank line; ordinals count records from 0."""
    ordinal = 0
    with paths.as_path(path).open("rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield ordinal, number, raw
                ordinal += 1


def _string(record, field, bad):
    value = record.get(field)
    if not isinstance(value, str) or not value:
        raise bad(field, f"expected a non-empty string, found {_describe(value)}")
    return value


def _strings(record, field, bad, *, required):
    value = record.get(field, None if required else [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(field, f"expected a list of strings, found {_describe(value)}")
    return value


def _describe(value):
    return "nothing" if value is None else f"{type(value).__name__} {json.dumps(value)[:60]}"


def parse_record(raw, *, path, line, ordinal, config):
    """(RewardExample, output record without scores) of one JSONL line (bytes), or BadRecord."""
    bad = lambda field, problem: BadRecord(path, line, field, problem)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(None, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        record = jsonl.loads(text)
    except ValueError as e:
        raise bad(None, str(e)) from None
    if not isinstance(record, dict):
        raise bad(None, f"expected a JSON object, found {_describe(record)}")
    task = record.get("task") or config.task
    if not task:
        raise bad("task", "no task: the record has none and config.task is empty")
    if not isinstance(task, str):
        raise bad("task", f"expected a string, found {_describe(task)}")
    try:
        rewards.check_reward_task(task)
    except ValueError as e:
        raise bad("task", str(e)) from None
    query = _string(record, "query", bad)
    answers = _strings(record, "answers", bad, required=True)
    if not answers or not all(answers):
        raise bad("answers", "no desired output to score: expected at least one non-empty answer")
    context = record.get("context", "")
    if not isinstance(context, str):
        raise bad("context", f"expected a string, found {_describe(context)}")

    fields = candidate_fields(task)
    lists = {f: _strings(record, f, bad, required=task == "chat") for f in fields}
    candidates = [c for f in fields for c in lists[f]]
    if not candidates:
        raise bad("/".join(fields), "no candidates to score")
    for field in fields:
        for aligned in ALIGNED_FIELDS[field]:
            _check_lines_up(record, aligned, f"{field!r}", len(lists[field]), bad)
    _check_lines_up(record, "teacher_scores", " + ".join(fields), len(candidates), bad)

    kept = min(len(candidates), config.max_candidates or len(candidates))
    output = dict(record)
    room = kept
    for field in fields:
        take = min(room, len(lists[field]))
        room -= take
        for name in (field, *ALIGNED_FIELDS[field]):
            if name in record:
                output[name] = record[name][:take]
    keys = tuple(candidates[:kept])
    # lrlm candidates are consecutive history chunks: each is followed by the next one.
    continuations = tuple(candidates[1:kept + 1]) + ("",) * (kept + 1 - len(candidates)) if task == "lrlm" \
        else ("",) * kept
    answer = answers[int(np.random.default_rng([config.seed, ordinal]).integers(len(answers)))]
    example = rewards.RewardExample(task=task, query=query, answer=answer, keys=keys,
                                    continuations=continuations, context=context)
    return example, output


def _check_lines_up(record, field, against, length, bad):
    value = record.get(field)
    if field in record and (not isinstance(value, list) or len(value) != length):
        found = len(value) if isinstance(value, list) else f"not a list ({type(value).__name__}), so no"
        raise bad(field, f"does not line up with {against}: {found} entries for {length}")


def scan_file(path, config):
    """(number of records, sha256 of the file); raises the first BadRecord unless skipping them."""
    with paths.as_path(path).open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    count = 0
    for ordinal, line, raw in record_lines(path):
        count += 1
        try:
            parse_record(raw, path=path, line=line, ordinal=ordinal, config=config)
        except BadRecord:
            if not config.skip_bad_records:
                raise
    return count, digest


def score_examples(lm, examples, config, *, seed):
    """The fields each example's output record gains."""
    options = dict(key_max_tokens=config.key_max_tokens, batch_size=config.batch_size,
                   max_length=config.max_length or None)
    if config.reward == "likelihood":
        return [{"teacher_scores": _floats(s)} for s in rewards.likelihood_rewards(lm, examples, **options)]
    return [{"teacher_scores": _floats(r), "teacher_ranks": k.tolist()}
            for r, k in rewards.rank_aware_rewards(lm, examples, seed=seed, **config.rank, **options)]


def _floats(values):
    # The shortest text that reads back as the same float32 (-2.07 rather than -2.069999933242798).
    return [float(str(np.float32(v))) for v in values]


def _shard_suffix(process_index, process_count):
    return ".jsonl" if process_count == 1 else f".{process_index}-of-{process_count}.jsonl"


def shard_name(shard, process_index, process_count):
    return f"{shard:05d}{_shard_suffix(process_index, process_count)}"


def _my_records(start, stop, process_index, process_count):
    return len(range(start + (process_index - start) % process_count, stop, process_count))


def _write_lines(path, entries):
    with atomic_file(path, "wb") as f:
        f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8"))


def _check_manifest(shard_dir, manifest):
    path = shard_dir / "manifest.json"
    if path.exists():
        found = json.loads(path.read_text())
        if found != manifest:
            changed = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
            raise ValueError(f"{shard_dir} holds shards of another run ({', '.join(changed)} differ); "
                             "use a new workdir or delete that folder")
    else:
        _write_lines(path, [manifest])


def score_shards(lm, path, *, config, shard_dir, num_records, process_index, process_count):
    """Scores this process's records of every unfinished shard."""
    size = config.shard_size
    done = [s for s in range(-(-num_records // size))
            if (shard_dir / shard_name(s, process_index, process_count)).exists()]
    mine = _my_records(0, num_records, process_index, process_count)
    resumed = sum(_my_records(s * size, min(num_records, (s + 1) * size), process_index, process_count) for s in done)
    # A killed run can leave the temporary file of a shard it was writing; this process's own only.
    for stale in shard_dir.glob(f".*{_shard_suffix(process_index, process_count)}.tmp-*"):
        stale.unlink()
    if done:
        logging.info("%s: resuming, %d of %d shards already scored", path, len(done), -(-num_records // size))
    with tqdm(total=mine, initial=resumed, unit="record", desc=pathlib.Path(path).name) as bar:
        for shard, group in itertools.groupby(record_lines(path), key=lambda r: r[0] // size):
            target = shard_dir / shard_name(shard, process_index, process_count)
            records = [r for r in group if r[0] % process_count == process_index]
            if target.exists():
                continue
            entries, examples, outputs = [], [], []
            for ordinal, line, raw in records:
                try:
                    example, output = parse_record(raw, path=path, line=line, ordinal=ordinal, config=config)
                except BadRecord as e:
                    if not config.skip_bad_records:
                        raise
                    entries.append({"i": ordinal, "skipped": str(e)})
                    continue
                examples.append(example)
                outputs.append({"i": ordinal, "record": output})
            seed = int(np.random.default_rng([config.seed, shard, process_index]).integers(2**31 - 1))
            for output, fields in zip(outputs, score_examples(lm, examples, config, seed=seed)):
                output["record"].update(fields)
            _write_lines(target, sorted(entries + outputs, key=lambda e: e["i"]))
            bar.update(len(records))


def merge_shards(*, shard_dir, num_records, shard_size, process_count, output):
    """Writes the scored records in input order; returns the skip messages."""
    skipped = []
    with atomic_file(output, "wb") as f:
        for shard in range(-(-num_records // shard_size)):
            entries = []
            for p in range(process_count):
                part = shard_dir / shard_name(shard, p, process_count)
                if not part.exists():
                    raise RuntimeError(f"shard {part} is missing: has every process finished?")
                entries += [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines()]
            entries.sort(key=lambda e: e["i"])
            expected = list(range(shard * shard_size, min(num_records, (shard + 1) * shard_size)))
            if [e["i"] for e in entries] != expected:
                raise RuntimeError(f"shard {shard} in {shard_dir} does not hold records {expected[0]}..{expected[-1]} "
                                   "exactly once; delete the folder and score again")
            for e in entries:
                if "skipped" in e:
                    skipped.append(e["skipped"])
                else:
                    f.write((json.dumps(e["record"], ensure_ascii=False) + "\n").encode("utf-8"))
    return skipped


def check_config(config):
    if config.reward not in ("likelihood", "rank"):
        raise ValueError(f"unknown reward {config.reward!r}: expected 'likelihood' or 'rank'")
    rewards.check_sample_from(config.rank.sample_from)
    rewards.check_transform(config.rank.transform)
    if config.shard_size < 1:
        raise ValueError(f"shard_size must be positive, found {config.shard_size}")
    names = [pathlib.Path(p).name for p in config.inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"input file names must differ (outputs are named after them): {', '.join(names)}")
    if not names:
        raise ValueError("no inputs: set config.inputs")


def load_reward_lm(config):
    """The reward LLM over this host's devices: data parallel, model parallel over `model_parallel`."""
    import jax
    from llm_embedder_jax import assets, sharding
    from llm_embedder_jax.llm import RewardLM
    path = assets.smollm2_gguf() if config.llm == "smollm2" else config.llm
    mesh = sharding.make_mesh(model_parallel=config.model_parallel, devices=jax.local_devices())
    return RewardLM.from_pretrained(path, dtype=config.dtype, mesh=mesh)


def score_files(config, workdir, *, lm=None, process_index=0, process_count=1):
    """Scores every input file; returns the report. The LLM is loaded (when `lm` is None)
    only after every input has been checked."""
    check_config(config)
    workdir = paths.as_path(workdir)
    scans = {paths.as_path(p): scan_file(p, config) for p in config.inputs}
    for path in scans:
        if os.path.realpath(workdir / path.name) == os.path.realpath(path):
            raise ValueError(f"the output {workdir / path.name} would overwrite its input: choose another workdir")
    if lm is None:
        lm = load_reward_lm(config)
    started = time.time()
    scoring = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k] for k in SCORING_FIELDS}
    report = {"reward": config.reward, "files": {}, "skipped": 0}
    for path, (num_records, digest) in scans.items():
        shard_dir = workdir / "shards" / path.stem
        _check_manifest(shard_dir, {"sha256": digest, "records": num_records,
                                    "shard_size": config.shard_size, "process_count": process_count,
                                    "scoring": scoring})
        score_shards(lm, path, config=config, shard_dir=shard_dir, num_records=num_records,
                     process_index=process_index, process_count=process_count)
        distributed.barrier(f"score {path.name}: every share scored")
        if process_index != 0:
            continue
        skipped = merge_shards(shard_dir=shard_dir, num_records=num_records, shard_size=config.shard_size,
                               process_count=process_count, output=workdir / path.name)
        report["files"][str(path)] = {"output": str(workdir / path.name), "records": num_records,
                                      "scored": num_records - len(skipped), "skipped": len(skipped),
                                      "skipped_records": skipped[:MAX_REPORTED_SKIPS]}
        report["skipped"] += len(skipped)
        logging.info("%s: %d records scored, %d skipped -> %s", path, num_records - len(skipped), len(skipped),
                     workdir / path.name)
    report["seconds"] = round(time.time() - started, 1)
    if process_index == 0:
        _write_lines(workdir / "score_report.json", [report])
        if report["skipped"]:
            logging.warning("skipped %d bad records (skip_bad_records=True); see %s", report["skipped"],
                            workdir / "score_report.json")
    # The others wait for the merge: a process that exited now would wait for it at jax's shutdown, with a timeout.
    distributed.barrier("score: outputs merged")
    return report


def run_score(config, workdir):
    """`main.py --mode=score`."""
    import jax
    from llm_embedder_jax import validation
    validation.validate(config, "score")
    score_files(config, workdir, process_index=jax.process_index(), process_count=jax.process_count())
