"""Config checks before any work starts: unknown keys, wrong types, impossible combinations.

Every mode calls `validate(config, mode)` first thing, before it loads a model or reads
more than the first record of a file. What is checked is data, in three tables:

- REFERENCES: the mode's shipped config file is its schema. A key the reference lacks is
  a typo (the nearest known key is suggested), a key it has that the config lacks is
  missing, a value of another type is a mistake (an int passes for a float). The parts
  whose entries the user chooses (COLLECTIONS: `tasks` keyed by task name, the
  `datasets` and `eval_files` lists) are checked entry by entry against the reference's
  entry shape; FREE parts only need to be dicts (their own readers check their keys).
- RULES: per mode, (field, test, expectation) rows for single values; `*` in a field
  matches every entry of a collection.
- CHECKS: per mode, functions of the whole config for combinations (batch size and
  devices, GradCache chunks, loss settings and the datasets' first records, ...).

All problems come back at once in one ConfigError, a line each, naming the field and
the fix. Fields that other modules already check at the start of their mode (for
example `score.check_config`, `evaluate.check_config`) are not repeated here.
"""
import collections.abc
import difflib
import importlib
import json
import math

from llm_embedder_jax import paths, tasks

# The shipped config of each mode: (module, variant) of its get_config.
REFERENCES = {
    "train": ("configs.llm_embedder", "tiny"),
    "score": ("configs.score", None),
    "eval": ("configs.eval", None),
    "embed": ("configs.embed", None),
    "demo": ("configs.demo", None),
}
# Entries chosen by the user: "tasks" = keyed by task name, "list" = a list; each entry has the
# shape of the reference's first one.
COLLECTIONS = {
    "train": {"tasks": "tasks", "datasets": "list", "eval_files": "list"},
}
FREE = {"train": {"datasets.*.settings"}}  # only a dict is required (samples.task_settings checks the keys)
NULLABLE = {"train": {"datasets.*.task", "datasets.*.weight", "eval_files.*.task"}}
# Sub-configs of the demo that are whole configs of another mode (their data does not exist yet).
NESTED = {"demo": {"train": "train", "score": "score"}}


class ConfigError(ValueError):
    """Everything wrong with a config, one problem a line."""

    def __init__(self, mode, problems):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) with the {mode} config, found before any work started:\n"
                         f"{lines}")


# ----------------------------------------------------------------------------- rules: one value each

def _at_least(low):
    return (lambda v: v >= low), f">= {low}"


def _above(low):
    return (lambda v: v > low and math.isfinite(v)), f"a finite number > {low}"


def _within(low, high, *, open_low=False):
    test = (lambda v: low < v <= high) if open_low else (lambda v: low <= v <= high)
    return test, f"in {'(' if open_low else '['}{low}, {high}]"


def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(repr, choices))


def _task_or_empty(choices=tasks.TASKS, *, empty="from the records"):
    return (lambda v: v in ("", None, *choices)), f"'' ({empty}) or one of " + ", ".join(choices)


def _nonempty():
    return bool, "not empty"


def _dtypes():
    from llm_embedder_jax import export
    return _one_of(*export.DTYPES)


def _rules():
    """{mode: [(field pattern, test, expectation)]}; built on use (some choices live in heavier modules)."""
    from llm_embedder_jax import encoder, losses, search
    loss_fields = [(f"tasks.*.{name}", *_above(0)) for name in
                   ("temperature", "reward_temperature", "teacher_temperature", "student_temperature")]
    return {
        "train": [
            ("num_steps", *_at_least(1)), ("learning_rate", *_above(0)), ("weight_decay", *_at_least(0)),
            ("adam_eps", *_above(0)), ("warmup_ratio", *_within(0, 1)), ("grad_clip_norm", *_at_least(0)),
            ("gradcache_chunk", *_at_least(0)), ("on_nonfinite", *_one_of("skip", "stop")),
            ("dtype", *_dtypes()), ("remat", *_one_of(*encoder.REMAT_POLICIES)), ("model_parallel", *_at_least(1)),
            ("mixture", *_one_of("proportional", "weights")), ("global_batch_size", *_at_least(1)),
            ("group_size", *_at_least(1)), ("query_max_len", *_at_least(1)), ("key_max_len", *_at_least(1)),
            ("log_every", *_at_least(1)), ("eval_every", *_at_least(0)), ("eval_samples", *_at_least(1)),
            ("checkpoint_every", *_at_least(1)), ("stop_after_steps", *_at_least(0)),
            ("keep_checkpoints", *_at_least(1)), ("datasets", *_nonempty()),
            ("self_paced.interval", *_at_least(1)), ("self_paced.smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("self_paced.min_scale", *_above(0)), ("self_paced.max_scale", *_above(0)),
            ("tasks.*.loss", *_one_of(*losses.LOSSES)), *loss_fields,
            ("tasks.*.contrastive_weight", *_at_least(0)), ("tasks.*.distill_weight", *_at_least(0)),
            ("datasets.*.path", *_nonempty()), ("datasets.*.task", *_task_or_empty()),
            ("eval_files.*.path", *_nonempty()), ("eval_files.*.task", *_task_or_empty()),
        ],
        "score": [
            ("batch_size", *_at_least(1)), ("max_candidates", *_at_least(0)), ("key_max_tokens", *_at_least(0)),
            ("max_length", *_at_least(0)), ("model_parallel", *_at_least(1)), ("dtype", *_dtypes()),
            ("task", *_task_or_empty(tuple(tasks.REWARD_TEMPLATES))), ("llm", *_nonempty()),
            ("rank.num_samples", *_at_least(1)), ("rank.max_new_tokens", *_at_least(1)),
            ("rank.temperature", *_at_least(0)), ("rank.top_p", *_within(0, 1, open_low=True)),
        ],
        "eval": [
            ("task", *_task_or_empty()), ("max_records", *_at_least(0)),
            ("instructions", *_one_of("auto", "always", "never")), ("llm", *_nonempty()), ("dtype", *_dtypes()),
            ("model_parallel", *_at_least(1)), ("batch_size", *_at_least(1)), ("max_length", *_at_least(0)),
            ("key_max_tokens", *_at_least(0)), ("max_new_tokens", *_at_least(1)),
            ("embed.batch_size", *_at_least(1)), ("embed.max_length", *_at_least(1)),
            ("search.chunk_size", *_at_least(1)), ("search.query_batch", *_at_least(1)),
        ],
        "embed": [
            ("kind", *_one_of(*tasks.KINDS)), ("task", *_task_or_empty(empty="no instruction")),
            ("text_field", *_nonempty()), ("batch_size", *_at_least(1)), ("max_length", *_at_least(1)),
            ("dtype", *_dtypes()),
        ],
        "demo": [
            ("eval.k", *_at_least(1)), ("eval.key_max_tokens", *_at_least(0)),
            ("eval.batch_size", *_at_least(1)), ("eval.max_length", *_at_least(0)),
            ("eval.instructions", *_one_of("auto", "always", "never")), ("eval.retrievers", *_nonempty()),
            ("eval.embed.batch_size", *_at_least(1)), ("eval.embed.max_length", *_at_least(1)),
            ("eval.search.backend", *_one_of(*search.BACKENDS)), ("eval.search.chunk_size", *_at_least(1)),
            ("eval.search.query_batch", *_at_least(1)),
        ],
    }


# ----------------------------------------------------------------------------- checks: combinations

def _devices(config):
    import jax
    problems = []
    devices, processes, mp = jax.device_count(), jax.process_count(), config.model_parallel
    if mp < 1:
        return []  # a rule says so
    if devices % mp:
        return [f"config.model_parallel={mp} does not divide the {devices} devices: use a divisor of {devices}"]
    data = devices // mp
    need = math.lcm(data, processes)
    if config.global_batch_size % need:
        problems.append(f"config.global_batch_size={config.global_batch_size} does not split over {data} "
                        f"data-parallel devices ({devices} devices / model_parallel {mp}) and {processes} "
                        f"process(es): use a multiple of {need}")
    chunk = config.gradcache_chunk
    if chunk and (config.global_batch_size % chunk or chunk % data):
        problems.append(f"config.gradcache_chunk={chunk} must divide config.global_batch_size="
                        f"{config.global_batch_size} and be a multiple of the {data} data-parallel devices: "
                        f"use a multiple of {data} that divides {config.global_batch_size} (0 = off)")
    return problems


def _local_model_parallel(config):
    import jax
    local = jax.local_device_count()
    if config.model_parallel >= 1 and local % config.model_parallel:
        return [f"config.model_parallel={config.model_parallel} does not divide this host's {local} devices: "
                f"use a divisor of {local}"]
    return []


def _self_paced(config):
    sp = config.self_paced
    if sp.min_scale > sp.max_scale:
        return [f"config.self_paced.min_scale={sp.min_scale} is above max_scale={sp.max_scale}: swap them"]
    return []


def _datasets(config):
    """Dataset entries against the loss and sample settings (without reading the data)."""
    from llm_embedder_jax.data import samples
    problems = []
    for i, dataset in enumerate(config.datasets):
        where = f"config.datasets[{i}]"
        if dataset.task in tasks.TASKS and dataset.task not in config.tasks:
            problems.append(f"{where}.task={dataset.task!r} has no loss settings: add config.tasks.{dataset.task} "
                            f"(configs/llm_embedder.py RECIPE has the released ones)")
        if dataset.task in config.tasks:
            try:
                samples.task_settings(dataset.task, dataset.settings)
            except (ValueError, TypeError) as e:
                problems.append(f"{where}.settings: {e}")
        if config.mixture == "weights" and not (dataset.weight or 0) > 0:
            problems.append(f"{where}.weight={dataset.weight!r}: config.mixture='weights' needs a weight > 0 "
                            f"for every dataset")
    return problems


def _model_lengths(config):
    """query/key_max_len within the encoder's positions (beyond them, embeddings silently go wrong)."""
    from llm_embedder_jax import assets, encoder
    folder = paths.as_path(config.model) if config.model else assets.minilm_dir()
    if not (folder / "config.json").exists():
        return []  # loading the model names what is missing
    try:
        model = encoder.config_from_hf(json.loads((folder / "config.json").read_text()))
    except (ValueError, KeyError, TypeError):
        return []  # loading the model says what is wrong with its config.json
    limit = model.max_position_embeddings - model.position_offset
    return [f"config.{name}={config[name]} exceeds the {limit} positions of {folder}: use at most {limit}"
            for name in ("query_max_len", "key_max_len") if config[name] > limit]


def _first_record(path, task, skip_bad):
    from llm_embedder_jax.data import records, tfds_builder
    if tfds_builder.is_tfds_dir(path):
        return tfds_builder.TfdsRecords(path)[0]
    return next(iter(records.read_jsonl(path, task=task, skip_bad=skip_bad)))


def _training_data(config):
    """The first record of each dataset: can it serve its task's loss and sample settings?"""
    from llm_embedder_jax.data import records, samples
    problems = []
    root = paths.as_path(config.data_dir)
    for i, dataset in enumerate(config.datasets):
        where = f"config.datasets[{i}] ({root / dataset.path})"
        if dataset.task and dataset.task not in config.tasks:
            continue  # said above
        if not (root / dataset.path).exists():
            problems.append(f"{where}: no such file or folder: fix config.data_dir or the path")
            continue
        try:
            record = _first_record(str(root / dataset.path), dataset.task or None, config.skip_bad_records)
            task = record["task"]
            if task not in config.tasks:
                if not dataset.task:  # else `_datasets` has said so
                    problems.append(f"{where}: its records are {task!r} records, and config.tasks has no "
                                    f"{task!r} entry: add one")
                continue
            loss = config.tasks[task].loss
            if loss != "contrastive" and record["teacher_scores"] is None:
                problems.append(f"{where}: its first record ({record['source']}) has no teacher_scores, but "
                                f"config.tasks.{task}.loss={loss!r} needs them: score the data first "
                                f"(--mode=score) or use loss='contrastive'")
            try:
                settings = samples.task_settings(task, dataset.settings)
            except (ValueError, TypeError) as e:
                if not dataset.task:  # else `_datasets` has said so
                    problems.append(f"{where}.settings: {e}")
                continue
            samples.filter_reason(record, settings=settings, group_size=config.group_size)
        except records.DataError as e:
            problems.append(f"{where}: {e}")
        except StopIteration:
            problems.append(f"{where}: no usable record")
    for i, spec in enumerate(config.eval_files):
        if not (root / spec.path).exists():
            problems.append(f"config.eval_files[{i}] ({root / spec.path}): no such file")
    return problems


def _existing(field, *, allow=()):
    def check(config):
        values = config[field] if isinstance(config[field], (list, tuple)) else [config[field]]
        return [f"config.{field}: {value} does not exist" for value in values
                if value and value not in allow and not paths.as_path(value).exists()]
    return check


def _retriever_specs(config):
    specs = [spec.partition("=") for spec in config.eval.retrievers]
    problems = [f"config.eval.retrievers entry {name + sep + target!r}: expected '<name>=<retriever>'"
                for name, sep, target in specs if not (name and sep and target)]
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        problems.append(f"config.eval.retrievers: names must differ, found {names}")
    return problems


def _code_lrlm_settings(config):
    from llm_embedder_jax import demo
    problems = []
    for split in ("train", "test"):
        try:
            demo.data_settings(config, split)
        except (ValueError, TypeError) as e:
            problems.append(f"config.data ({split} split): {e}")
    return problems


# {mode: [(check, needs the data on disk)]}
CHECKS = {
    "train": [(_devices, False), (_self_paced, False), (_datasets, False), (_model_lengths, False),
              (_training_data, True)],
    "score": [(_local_model_parallel, False), (_existing("inputs"), True),
              (_existing("llm", allow=("smollm2",)), False)],
    "eval": [(_local_model_parallel, False), (_existing("files"), True),
             (_existing("llm", allow=("smollm2",)), False)],
    "embed": [(_existing("input"), True), (_existing("model"), False)],
    "demo": [(_retriever_specs, False), (_code_lrlm_settings, False)],
}


# ----------------------------------------------------------------------------- keys and types

def _is_mapping(value):
    import ml_collections  # here: the training core is imported where ml_collections is not installed
    return isinstance(value, (ml_collections.ConfigDict, collections.abc.Mapping))


def _type_name(reference):
    if _is_mapping(reference):
        return "a dict"
    if isinstance(reference, (list, tuple)):
        return "a list or tuple"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}[type(reference)]


def _same_type(value, reference):
    if isinstance(reference, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(reference, bool)
    if isinstance(reference, float):
        return isinstance(value, (int, float))
    if isinstance(reference, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(reference))


class _Schema:
    def __init__(self, mode):
        self.collections = COLLECTIONS.get(mode, {})
        self.free = FREE.get(mode, set())
        self.nullable = NULLABLE.get(mode, set())
        self.skip = set(NESTED.get(mode, {}))
        self.problems = []

    def check(self, value, reference, name, pattern):
        if reference is None or pattern in self.skip:
            return
        if value is None and pattern in self.nullable:
            return
        if not _same_type(value, reference) and not (_is_mapping(value) and _is_mapping(reference)):
            self.problems.append(f"{name}={value!r}: expected {_type_name(reference)}, found {type(value).__name__}")
            return
        kind = self.collections.get(pattern)
        if _is_mapping(reference):
            if pattern in self.free:
                return
            if kind == "tasks":
                self._tasks(value, reference, name, pattern)
            else:
                self._keys(value, reference, name, pattern)
        elif isinstance(reference, (list, tuple)):
            if kind == "list":
                for i, item in enumerate(value):
                    self.check(item, reference[0], f"{name}[{i}]", f"{pattern}.*")
            elif reference and len({type(r) for r in reference}) == 1:
                for i, item in enumerate(value):
                    self.check(item, reference[0], f"{name}[{i}]", f"{pattern}.*")

    def _keys(self, value, reference, name, pattern):
        known = list(reference.keys())
        for key in value.keys():
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(known)}"
                self.problems.append(f"{name}.{key}: unknown key; {hint}")
        for key in known:
            if key not in value.keys():
                self.problems.append(f"{name}.{key}: missing (the shipped config sets it to {reference[key]!r})")
            else:
                self.check(value[key], reference[key], f"{name}.{key}", f"{pattern}.{key}" if pattern else key)

    def _tasks(self, value, reference, name, pattern):
        entry = next(iter(reference.values()))
        for task in value.keys():
            if task not in tasks.TASKS:
                near = difflib.get_close_matches(task, tasks.TASKS, n=1)
                self.problems.append(f"{name}.{task}: unknown task; "
                                     + (f"did you mean {near[0]!r}?" if near else f"expected {', '.join(tasks.TASKS)}"))
            else:
                self._keys(value[task], entry, f"{name}.{task}", f"{pattern}.*")


def _reference(mode):
    module, variant = REFERENCES[mode]
    return importlib.import_module(module).get_config(variant)


def _values(config, pattern):
    """(name, value) of every field that `pattern` ("a.b", "a.*.b") names."""
    found = [("config", config)]
    for part in pattern.split("."):
        step = []
        for name, node in found:
            if part != "*":
                step.append((f"{name}.{part}", node[part]))
            elif _is_mapping(node):
                step += [(f"{name}.{key}", node[key]) for key in node.keys()]
            else:
                step += [(f"{name}[{i}]", item) for i, item in enumerate(node)]
        found = step
    return found


def problems(config, mode, *, check_data=True, prefix="config"):
    """Every problem of `config` for `mode` (strings); empty when it is fine."""
    if mode not in REFERENCES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(REFERENCES)}")
    import ml_collections
    if not isinstance(config, ml_collections.ConfigDict):
        return [f"{prefix}: get_config() returned a {type(config).__name__}; expected an ml_collections.ConfigDict"]
    schema = _Schema(mode)
    schema.check(config, _reference(mode), prefix, "")
    found = schema.problems
    if found:  # the rules below assume the right keys and types
        return found
    for pattern, test, expected in _rules()[mode]:
        for name, value in _values(config, pattern):
            if value is not None and not test(value):
                found.append(f"{prefix}{name[len('config'):]}={value!r}: expected {expected}")
    for check, needs_data in CHECKS.get(mode, []):
        if check_data or not needs_data:
            found += [problem.replace("config", prefix, 1) for problem in check(config)]
    for field, nested_mode in NESTED.get(mode, {}).items():
        found += problems(config[field], nested_mode, check_data=False, prefix=f"{prefix}.{field}")
    return found


def validate(config, mode, *, check_data=True):
    """Raises ConfigError listing every problem of `config` for `mode`; the first call of each mode.

    `check_data=False` skips what needs the input files (the demo makes them later).
    """
    found = problems(config, mode, check_data=check_data)
    if found:
        raise ConfigError(mode, found)
