"""Reader for the released LLM-Embedder JSONL training format, with validation.

One JSON object per line. Fields this codebase reads:

    query           str, required
    task            str, one of tasks.TASKS; or given by the caller (they must agree)
    pos, neg        lists of str, required except for chat (pos may be empty: lrlm)
    history         list of str, required for chat: its candidates
    teacher_scores  optional list of finite numbers, aligned with pos + neg
                    (history for chat); higher is better
    answers         list of str; required only when the caller asks (the reward
                    LLM needs them, training does not)
    context         optional str (lrlm): text between the candidates and the query chunk

Other fields (query_id, pos_index, ...) are ignored. Every record comes back as
a plain dict with exactly the keys of `FIELDS` plus `source` ("file:line"), the
fields a task does not use set to None. Bad lines raise `DataError` naming
file, line and field; with `skip_bad=True` they are counted by reason instead,
and the counts are logged and kept on the reader.
"""
import collections
import functools
import logging
import math
import os

from llm_embedder_jax import jsonl, paths, tasks

FIELDS = ("task", "query", "pos", "neg", "history", "teacher_scores", "answers", "context")

# DataError.reason values: the keys of the skip counts.
NOT_UTF8 = "not UTF-8"
MALFORMED_JSON = "malformed JSON"
NOT_AN_OBJECT = "not an object"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
BAD_TASK = "bad task"
TEACHER_LENGTH = "teacher_scores length"
NO_CANDIDATES = "no candidates"
EMPTY_FILE = "empty file"

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: says where (file:line), which field, and why."""

    def __init__(self, detail, *, where, field=None, reason):
        self.detail = detail
        self.where = where
        self.field = field
        self.reason = reason
        field_part = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {field_part}{detail}")

    def __reduce__(self):
        # Keyword-only arguments: the default exception pickling would drop them
        # (grain worker processes send errors back pickled).
        return functools.partial(DataError, where=self.where, field=self.field, reason=self.reason), (self.detail,)


def candidates(record):
    """(candidate texts, number of labelled positives at their front).

    Chat candidates are its history (no labelled positive); elsewhere pos + neg.
    """
    if record["task"] == "chat":
        return record["history"], 0
    return record["pos"] + record["neg"], len(record["pos"])


def _string_list(obj, field, where, *, required=True):
    value = obj.get(field)
    if value is None:
        if required:
            raise DataError("missing", where=where, field=field, reason=MISSING_FIELD)
        return None
    if not isinstance(value, list):
        raise DataError(f"expected a list of strings, got {type(value).__name__}",
                        where=where, field=field, reason=WRONG_TYPE)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(f"expected a list of strings, item {i} is {type(item).__name__}",
                            where=where, field=field, reason=WRONG_TYPE)
    return value


def _record_task(obj, task, where):
    named = obj.get("task")
    if named is not None and (not isinstance(named, str) or named not in tasks.TASKS):
        raise DataError(f"unknown task {named!r}: expected one of {', '.join(tasks.TASKS)}",
                        where=where, field="task", reason=BAD_TASK)
    if task is not None and named is not None and named != task:
        raise DataError(f"the record says {named!r} but the reader was given {task!r}",
                        where=where, field="task", reason=BAD_TASK)
    if task is None and named is None:
        raise DataError("missing, and no task was given to the reader",
                        where=where, field="task", reason=MISSING_FIELD)
    return task or named


def _teacher_scores(obj, where, num_candidates, aligned_with):
    scores = obj.get("teacher_scores")
    if scores is None:
        return None
    if not isinstance(scores, list):
        raise DataError(f"expected a list of numbers, got {type(scores).__name__}",
                        where=where, field="teacher_scores", reason=WRONG_TYPE)
    for i, score in enumerate(scores):
        # bool is an int subclass, but true/false in a score list is a data bug.
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"expected finite numbers, item {i} is {score!r}",
                            where=where, field="teacher_scores", reason=WRONG_TYPE)
    if len(scores) != num_candidates:
        raise DataError(f"has {len(scores)} scores but {aligned_with} has {num_candidates} candidates",
                        where=where, field="teacher_scores", reason=TEACHER_LENGTH)
    return [float(s) for s in scores]


def validate_record(obj, *, where, task=None, require_answers=False):
    """Checks one decoded JSON value; returns the normalised record dict."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", where=where, reason=NOT_AN_OBJECT)
    task = _record_task(obj, task, where)
    query = obj.get("query")
    if query is None:
        raise DataError("missing", where=where, field="query", reason=MISSING_FIELD)
    if not isinstance(query, str) or not query:
        raise DataError(f"expected a non-empty string, got {query!r:.40}", where=where, field="query",
                        reason=WRONG_TYPE)
    record = dict.fromkeys(FIELDS)
    record.update(task=task, query=query, source=where)
    if task == "chat":
        record["history"] = _string_list(obj, "history", where)
        num_candidates, aligned_with, empty_field = len(record["history"]), "history", "history"
    else:
        record["pos"] = _string_list(obj, "pos", where)
        record["neg"] = _string_list(obj, "neg", where)
        num_candidates, aligned_with, empty_field = len(record["pos"]) + len(record["neg"]), "pos + neg", "pos"
    if num_candidates == 0:
        raise DataError(f"no candidates: {aligned_with} is empty", where=where, field=empty_field,
                        reason=NO_CANDIDATES)
    record["teacher_scores"] = _teacher_scores(obj, where, num_candidates, aligned_with)
    record["answers"] = _string_list(obj, "answers", where, required=require_answers)
    context = obj.get("context")
    if context is not None and not isinstance(context, str):
        raise DataError(f"expected a string, got {type(context).__name__}", where=where, field="context",
                        reason=WRONG_TYPE)
    record["context"] = context
    return record


def parse_line(raw, *, where, task=None, require_answers=False):
    """One raw JSONL line (bytes) → normalised record, or DataError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start} of the line is {raw[e.start:e.start + 1]!r})",
                        where=where, reason=NOT_UTF8) from None
    try:
        obj = jsonl.loads(text)
    except ValueError as e:
        raise DataError(str(e), where=where, reason=MALFORMED_JSON) from None
    return validate_record(obj, where=where, task=task, require_answers=require_answers)


class JsonlReader:
    """Iterates over the validated records of one JSONL file.

    `skipped` counts the bad lines by reason (filled while iterating, only
    with skip_bad=True); blank lines are not records and are not counted.
    """

    def __init__(self, path, *, task=None, skip_bad=False, require_answers=False):
        tasks.check_task(task)
        self.path = os.fspath(path)
        self.task = task
        self.skip_bad = skip_bad
        self.require_answers = require_answers
        self.skipped = collections.Counter()

    def __iter__(self):
        self.skipped.clear()
        lines = 0
        with paths.as_path(self.path).open("rb") as f:  # local or remote (gs://...)
            for line_number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                lines += 1
                try:
                    record = parse_line(raw, where=f"{self.path}:{line_number}", task=self.task,
                                        require_answers=self.require_answers)
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    self.skipped[e.reason] += 1
                    continue
                yield record
        if lines == 0:
            raise DataError("empty file: no JSON lines", where=self.path, reason=EMPTY_FILE)
        if self.skipped:
            log.warning("%s: skipped %d bad lines of %d: %s", self.path, sum(self.skipped.values()), lines,
                        dict(self.skipped))


def read_jsonl(path, *, task=None, skip_bad=False, require_answers=False):
    """The validated records of a JSONL file (an iterable `JsonlReader`).

    `task` applies to records without a `task` field and must agree with those
    that have one. After iterating, `reader.skipped` holds the skip counts.
    """
    return JsonlReader(path, task=task, skip_bad=skip_bad, require_answers=require_answers)
