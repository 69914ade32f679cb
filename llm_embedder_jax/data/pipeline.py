"""Training input: homogeneous, tokenised, length-bucketed global batches.

    datasets = [
        dict(name="msmarco", path="data/qa.json"),                        # task from the records
        dict(name="msc", path="data/chat.json", settings=dict(select_negative="teacher+")),
        dict(name="toolbench", path="data/tool.json"),
        dict(name="toolbench", path="data/tool.json"),                    # listed twice: twice the share
    ]
    it = make_train_iterator(datasets, tokenizer=tokenizer, global_batch_size=800, group_size=8,
                             query_max_len=256, key_max_len=256, seed=0,
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)          # this process's rows of global batch 0
    state = it.get_state()    # JSON-serialisable; it.set_state(state) resumes the identical stream

Each dataset entry: `path` (a JSONL file, or a TFDS folder from
`tfds_builder.build_tfds`), optional `name` (default: from the path; repeated
names get `_2`, `_3`, ...), `task` (default: the records' `task` field),
`weight` (give it to every entry or to none: none mixes in proportion to each
dataset's usable size), `settings` (overrides of the task's released
`samples.RELEASE_SETTINGS`) and `skip_bad` (count bad records instead of
failing). A JSONL file is loaded into memory; a TFDS folder is read on demand,
so convert large datasets first. Either way every record is read once at
start-up to apply the filters, and the counts of unused records are logged.

The stream is a grain `MapDataset` in which global batch `step` is a pure
function of (seed, step): `mixture.Schedule` picks the dataset and its batch
number, a per-epoch shuffle of that dataset's usable records (grain's index
shuffle) picks the records, and each sample's Generator is seeded from (seed,
dataset, epoch, record). Each dataset's epoch drops its remainder (fewer
records than a global batch), so no batch holds a record twice. The
iterator's state is therefore just the next step.

A batch (numpy):

    task, dataset     str: every row of a global batch comes from one dataset
    query_ids, query_mask   int32 [B/P, Lq]
    key_ids, key_mask       int32 [B/P * G, Lk], query-major (row b*G + j: candidate j of query b)
    teacher_scores          float32 [B/P, G], candidate 0 = the positive; NaN where a record has none
    has_teacher             bool: every row has teacher scores

Lq and Lk are length buckets (`buckets.bucket_length`, capped at the max
lengths) of the longest query / key of the *global* batch, so every process pads to the same width, as
`jax.make_array_from_process_local_data` needs; that is why each process
tokenises the whole global batch and keeps rows [i*B/P, (i+1)*B/P).
"""
import collections
import dataclasses
import logging
import os

import grain
import numpy as np
import tokenizers

from llm_embedder_jax import buckets, tasks
from llm_embedder_jax.data import mixture, samples, tfds_builder
from llm_embedder_jax.data.records import BAD_TASK, DataError, read_jsonl

OVER_MAX_SAMPLE_NUM = "over max_sample_num"
DATASET_KEYS = ("name", "path", "task", "weight", "settings", "skip_bad")

log = logging.getLogger(__name__)


def _plain_dict(mapping):
    return mapping.to_dict() if hasattr(mapping, "to_dict") else dict(mapping)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str
    task: str | None = None
    weight: float | None = None
    settings: dict | None = None
    skip_bad: bool = False


def dataset_specs(datasets_config):
    """Checks the dataset entries; makes names unique (a repeated dataset gets `_2`, ...)."""
    entries = [_plain_dict(entry) for entry in datasets_config]
    if not entries:
        raise ValueError("no datasets configured")
    specs, seen = [], collections.Counter()
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(DATASET_KEYS))
        if unknown:
            raise ValueError(f"dataset {i}: unknown keys {unknown}; expected some of {list(DATASET_KEYS)}")
        if not entry.get("path"):
            raise ValueError(f"dataset {i}: no path")
        path = os.fspath(entry["path"])
        tasks.check_task(entry.get("task"))
        name = entry.get("name") or tfds_builder.config_name(path)
        seen[name] += 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        settings = entry.get("settings")
        specs.append(DatasetSpec(name=name, path=path, task=entry.get("task"), weight=entry.get("weight"),
                                 settings=None if settings is None else _plain_dict(settings),
                                 skip_bad=bool(entry.get("skip_bad", False))))
    weighted = [spec.weight is not None for spec in specs]
    if any(weighted) and not all(weighted):
        raise ValueError("give a weight to every dataset or to none (none: proportional to size), "
                         f"got weights {[spec.weight for spec in specs]}")
    return specs


@dataclasses.dataclass
class PreparedDataset:
    name: str
    task: str
    settings: samples.SampleSettings
    records: object  # a sequence of record dicts: a list, or TfdsRecords
    usable: np.ndarray  # indices into `records` that samples are drawn from
    dropped: collections.Counter  # records not used, by reason (bad lines, filters, the cap)


def _load(spec):
    if tfds_builder.is_tfds_dir(spec.path):
        records = tfds_builder.TfdsRecords(spec.path)
        return records, collections.Counter(records.skipped)
    if os.path.isdir(spec.path):
        raise FileNotFoundError(f"{spec.path} is a folder but not a prepared TFDS dataset "
                                f"(no dataset_info.json); pass a JSONL file or build_tfds's folder")
    reader = read_jsonl(spec.path, task=spec.task, skip_bad=spec.skip_bad)
    return list(reader), collections.Counter(reader.skipped)


def prepare_dataset(spec, *, group_size):
    """Loads one dataset and decides which records can make samples, counting the rest."""
    records, dropped = _load(spec)
    if not len(records):
        raise ValueError(f"{spec.path}: no usable records (skipped: {dict(dropped)})")
    task = spec.task or records[0]["task"]
    settings = samples.task_settings(task, spec.settings)
    usable = []
    for index in range(len(records)):
        record = records[index]
        try:
            if record["task"] != task:
                raise DataError(f"{record['task']!r} in a {task!r} dataset: a dataset holds one task",
                                where=record["source"], field="task", reason=BAD_TASK)
            reason = samples.filter_reason(record, settings=settings, group_size=group_size)
        except DataError as e:
            if not spec.skip_bad:
                raise
            reason = e.reason
        if reason is None:
            usable.append(index)
        else:
            dropped[reason] += 1
    if settings.max_sample_num is not None and len(usable) > settings.max_sample_num:
        dropped[OVER_MAX_SAMPLE_NUM] += len(usable) - settings.max_sample_num
        usable = usable[:settings.max_sample_num]
    log.info("dataset %s (%s, %s): %d records, %d usable, not used: %s",
             spec.name, task, spec.path, len(records), len(usable), dict(dropped))
    return PreparedDataset(name=spec.name, task=task, settings=settings, records=records,
                           usable=np.asarray(usable, np.int64), dropped=dropped)


def _derived_seed(seed, dataset_index):
    # grain's shuffle takes a 32-bit seed; derive one per dataset.
    return int(np.random.SeedSequence([seed, dataset_index]).generate_state(1)[0])


class _DatasetBatches:
    """Batch number j of one dataset → its global batch of samples (not tokenised)."""

    def __init__(self, prepared, dataset_index, *, seed, global_batch_size, group_size):
        self.prepared = prepared
        self.dataset_index = dataset_index
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.group_size = group_size
        self.num_usable = len(prepared.usable)
        self.batches_per_epoch = self.num_usable // global_batch_size
        # Index e*n + i of this shuffle is the i-th record of epoch e: a new order every epoch.
        self.order = grain.MapDataset.range(self.num_usable).shuffle(seed=_derived_seed(seed, dataset_index))

    def __call__(self, batch_number, _slot):
        # The remainder of each epoch is dropped, so that no batch holds a record twice.
        epoch, slot = divmod(batch_number, self.batches_per_epoch)
        start = epoch * self.num_usable + slot * self.global_batch_size
        prepared = self.prepared
        batch = []
        for position in range(start, start + self.global_batch_size):
            index = int(prepared.usable[self.order[position]])
            rng = samples.sample_rng(self.seed, self.dataset_index, epoch, index)
            batch.append(samples.build_sample(prepared.records[index], settings=prepared.settings,
                                              group_size=self.group_size, rng=rng))
        return {"dataset": prepared.name, "task": prepared.task, "samples": batch}


def _truncating_copy(tokenizer, max_length):
    # A private copy with fixed truncation and no padding: the caller's
    # tokenizer is never mutated, and encode_batch on an unchanging tokenizer
    # is safe from grain's reader threads.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a Hugging Face fast tokenizer "
                        f"(no backend_tokenizer)")
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length)
    return copy


class BatchEncoder:
    """Samples of one global batch → this process's rows, tokenised and bucket-padded."""

    def __init__(self, tokenizer, *, query_max_len, key_max_len, process_index=0, process_count=1):
        self.query_max_len = query_max_len
        self.key_max_len = key_max_len
        self.process_index = process_index
        self.process_count = process_count
        self.pad_id = 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self._query_tokenizer = _truncating_copy(tokenizer, query_max_len)
        self._key_tokenizer = _truncating_copy(tokenizer, key_max_len)

    def __call__(self, batch):
        rows = batch["samples"]
        size, group = len(rows), len(rows[0]["keys"])
        query_tokens = [e.ids for e in self._query_tokenizer.encode_batch([row["query"] for row in rows])]
        key_tokens = [e.ids for e in self._key_tokenizer.encode_batch([key for row in rows for key in row["keys"]])]
        query_ids, query_mask = buckets.pad_batch(query_tokens, max_length=self.query_max_len, pad_id=self.pad_id)
        key_ids, key_mask = buckets.pad_batch(key_tokens, max_length=self.key_max_len, pad_id=self.pad_id)
        missing = np.full(group, np.nan, np.float32)
        teacher = np.stack([missing if row["teacher_scores"] is None else row["teacher_scores"] for row in rows],
                           dtype=np.float32)
        local = size // self.process_count
        first = self.process_index * local
        queries, keys = slice(first, first + local), slice(first * group, (first + local) * group)
        return {
            "task": batch["task"],
            "dataset": batch["dataset"],
            "query_ids": query_ids[queries],
            "query_mask": query_mask[queries],
            "key_ids": key_ids[keys],
            "key_mask": key_mask[keys],
            "teacher_scores": teacher[queries],
            "has_teacher": all(row["teacher_scores"] is not None for row in rows),
        }


def make_train_dataset(datasets_config, *, tokenizer, global_batch_size, group_size, query_max_len, key_max_len,
                       seed, process_index=0, process_count=1):
    """A grain MapDataset whose element `step` is this process's part of global batch `step`."""
    if global_batch_size < 1 or group_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} and group_size={group_size} must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} does not split over {process_count} processes")
    specs = dataset_specs(datasets_config)
    prepared = [prepare_dataset(spec, group_size=group_size) for spec in specs]
    for dataset in prepared:
        if len(dataset.usable) < global_batch_size:
            raise ValueError(f"dataset {dataset.name}: {len(dataset.usable)} usable records, fewer than one "
                             f"global batch of {global_batch_size} (not used: {dict(dataset.dropped)})")
    per_dataset = []
    for index, dataset in enumerate(prepared):
        make_batch = _DatasetBatches(dataset, index, seed=seed, global_batch_size=global_batch_size,
                                     group_size=group_size)
        per_dataset.append(grain.MapDataset.range(make_batch.batches_per_epoch).repeat().map_with_index(make_batch))
    weights = None if specs[0].weight is None else [spec.weight for spec in specs]
    counts = mixture.cycle_counts([len(d.usable) // global_batch_size for d in prepared], weights)
    schedule = mixture.Schedule(counts, seed=seed)
    encoder = BatchEncoder(tokenizer, query_max_len=query_max_len, key_max_len=key_max_len,
                           process_index=process_index, process_count=process_count)
    return grain.MapDataset.select_from_datasets(per_dataset, selection_map=schedule).map(encoder)


def make_train_iterator(datasets_config, *, tokenizer, global_batch_size, group_size, query_max_len, key_max_len,
                        seed, process_index=0, process_count=1, read_threads=1, prefetch=2):
    """An endless grain iterator over `make_train_dataset`'s batches, from step 0.

    `get_state()` / `set_state()` give and take {"next_index": step}: small,
    JSON-serialisable. `read_threads` threads prepare up to `prefetch` batches
    ahead. There are no worker processes (grain's worker_count is 0): grain
    would re-shard the range sources of the schedule between workers, and
    tokenising in threads already runs outside the GIL.
    """
    dataset = make_train_dataset(
        datasets_config, tokenizer=tokenizer, global_batch_size=global_batch_size, group_size=group_size,
        query_max_len=query_max_len, key_max_len=key_max_len, seed=seed,
        process_index=process_index, process_count=process_count)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)))
