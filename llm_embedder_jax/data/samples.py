"""Training samples: one query and a group of G candidates, the positive first.

A pure function of a record, the settings and a numpy Generator; the pipeline
seeds that Generator from (seed, dataset, epoch, record index), so a sample is
reproducible from its position in the stream alone.

Semantics, after the released FlagEmbedding llm_embedder code
(`RetrievalDataset.get_train_process_fn`):

- Candidates are `pos + neg`, or `history` for chat (no labelled positive).
- select_positive: `first` / `random` labelled positive; `teacher`: the
  highest teacher score among all candidates (for chat and lrlm, whose `pos`
  is empty, the only way to pick one); `teacher-pos`: the highest-scored
  labelled positive. The other labelled positives are never used as negatives;
  a positive taken from the negatives leaves the negative pool.
- select_negative orders the negative pool: `first` (file order), `random`
  (a permutation), `teacher+` (highest teacher score first), `teacher-`
  (lowest first); the group takes the first G-1 of that order and cycles
  through it again when the pool is smaller than G-1 (each negative repeats
  at most once more than any other).
- teacher_scores_min / teacher_scores_margin filter whole records, as the
  release does: a record whose best teacher score is below the minimum, or
  whose scores span less than the margin (max - min), carries no usable
  signal and is dropped (counted, see `filter_reason`).
- max_sample_num caps the records used from one dataset: the first ones that
  pass the filters.
- teacher_scores come back re-ordered like the keys: [G], candidate 0 = the
  positive.
"""
import dataclasses

import numpy as np

from llm_embedder_jax import tasks
from llm_embedder_jax.data.records import MISSING_FIELD, DataError, candidates

SELECT_POSITIVE = ("first", "random", "teacher", "teacher-pos")
SELECT_NEGATIVE = ("random", "first", "teacher+", "teacher-")

# filter_reason values: the keys of the filter counts.
BELOW_MIN = "teacher_scores below min"
WITHIN_MARGIN = "teacher_scores within margin"
NO_NEGATIVES = "no negatives"


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    select_positive: str = "first"  # first | random | teacher | teacher-pos
    select_negative: str = "random"  # random | first | teacher+ | teacher-
    teacher_scores_min: float | None = None  # drop records whose best teacher score is lower
    teacher_scores_margin: float | None = None  # drop records whose scores span less (max - min)
    max_sample_num: int | None = None  # use at most this many records of the dataset
    instruction: bool = True  # prepend the task's query / key instructions
    key_with_continuation: bool = False  # lrlm: keys are each candidate with the one after it (tasks.py)

    def __post_init__(self):
        if self.select_positive not in SELECT_POSITIVE:
            raise ValueError(f"select_positive={self.select_positive!r}: expected one of {SELECT_POSITIVE}")
        if self.select_negative not in SELECT_NEGATIVE:
            raise ValueError(f"select_negative={self.select_negative!r}: expected one of {SELECT_NEGATIVE}")
        if self.max_sample_num is not None and self.max_sample_num < 1:
            raise ValueError(f"max_sample_num={self.max_sample_num}: expected a positive number or None")
        if self.teacher_scores_margin is not None and self.teacher_scores_margin < 0:
            raise ValueError(f"teacher_scores_margin={self.teacher_scores_margin}: expected >= 0 or None")

    @property
    def needs_teacher_scores(self):
        return (self.select_positive in ("teacher", "teacher-pos")
                or self.select_negative in ("teacher+", "teacher-")
                or self.teacher_scores_min is not None
                or self.teacher_scores_margin is not None)


# The released recipe, per task (DESIGN.md §2.3).
RELEASE_SETTINGS = {
    "qa": SampleSettings(select_positive="first", select_negative="random"),
    "convsearch": SampleSettings(select_positive="first", select_negative="random"),
    "chat": SampleSettings(select_positive="teacher", select_negative="random"),
    "lrlm": SampleSettings(select_positive="teacher", select_negative="random",
                           max_sample_num=10_000, teacher_scores_margin=0.1),
    "icl": SampleSettings(select_positive="random", select_negative="random"),
    "tool": SampleSettings(select_positive="first", select_negative="random"),
}


def task_settings(task, overrides=None):
    """The task's released settings with `overrides` (a dict / ConfigDict) applied.

    Unknown keys are an error, not ignored.
    """
    tasks.check_task(task)
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(SampleSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown sample settings {unknown}: expected some of {sorted(known)}")
    if overrides.get("key_with_continuation") and task != "lrlm":
        raise ValueError(f"key_with_continuation applies to lrlm (consecutive history chunks), not {task}")
    return dataclasses.replace(RELEASE_SETTINGS[task], **overrides)


def sample_rng(seed, dataset_index, epoch, record_index):
    """The Generator for one sample: a function of its position only."""
    return np.random.default_rng(np.random.SeedSequence([seed, dataset_index, epoch, record_index]))


def _check_compatible(record, settings):
    """Settings that this record cannot serve are an error, not a skip."""
    if settings.needs_teacher_scores and record["teacher_scores"] is None:
        raise DataError(f"missing, but {settings} needs teacher scores", where=record["source"],
                        field="teacher_scores", reason=MISSING_FIELD)
    _, num_pos = candidates(record)
    if settings.select_positive in ("first", "random", "teacher-pos") and num_pos == 0:
        field = "history" if record["task"] == "chat" else "pos"
        raise DataError(f"no labelled positive, but select_positive={settings.select_positive!r} needs one "
                        f"(use 'teacher')", where=record["source"], field=field, reason=MISSING_FIELD)


def _teacher_positive(record):
    return int(np.argmax(record["teacher_scores"]))


def filter_reason(record, *, settings, group_size):
    """Why the record is dropped (a filter-count key), or None to keep it.

    Raises DataError when the settings cannot apply to the record at all.
    """
    _check_compatible(record, settings)
    scores = record["teacher_scores"]
    if settings.teacher_scores_min is not None and max(scores) < settings.teacher_scores_min:
        return BELOW_MIN
    if settings.teacher_scores_margin is not None and max(scores) - min(scores) < settings.teacher_scores_margin:
        return WITHIN_MARGIN
    texts, num_pos = candidates(record)
    pool = len(texts) - num_pos
    if settings.select_positive == "teacher" and _teacher_positive(record) >= num_pos:
        pool -= 1
    if group_size > 1 and pool == 0:
        return NO_NEGATIVES
    return None


def _positive(record, settings, num_pos, rng):
    if settings.select_positive == "first":
        return 0
    if settings.select_positive == "random":
        return int(rng.integers(num_pos))
    if settings.select_positive == "teacher":
        return _teacher_positive(record)
    return int(np.argmax(record["teacher_scores"][:num_pos]))


def _ordered_negatives(pool, scores, settings, rng):
    if settings.select_negative == "first":
        return pool
    if settings.select_negative == "random":
        return rng.permutation(pool)
    pool_scores = np.asarray(scores, np.float64)[pool]
    descending = settings.select_negative == "teacher+"
    # Stable, so equal scores keep file order.
    return pool[np.argsort(-pool_scores if descending else pool_scores, kind="stable")]


def build_sample(record, *, settings, group_size, rng):
    """{"query": str, "keys": [G] str, "teacher_scores": float32 [G] or None, "task": str}."""
    _check_compatible(record, settings)
    texts, num_pos = candidates(record)
    if settings.key_with_continuation:
        texts = tasks.keys_with_continuation(texts)
    scores = record["teacher_scores"]
    positive = _positive(record, settings, num_pos, rng)
    pool = np.array([i for i in range(num_pos, len(texts)) if i != positive], np.int64)
    num_negatives = group_size - 1
    if num_negatives and not len(pool):
        raise DataError("no negatives left after choosing the positive", where=record["source"],
                        field="history" if record["task"] == "chat" else "neg", reason=NO_NEGATIVES)
    ordered = _ordered_negatives(pool, scores, settings, rng)
    order = [positive] + [int(i) for i in ordered[np.arange(num_negatives) % max(len(ordered), 1)]]
    query, keys = record["query"], [texts[i] for i in order]
    task = record["task"]
    if settings.instruction:
        query = tasks.with_instruction([query], task=task, kind="query")[0]
        keys = tasks.with_instruction(keys, task=task, kind="key")
    teacher = None if scores is None else np.asarray(scores, np.float32)[order]
    return {"query": query, "keys": keys, "teacher_scores": teacher, "task": task}
