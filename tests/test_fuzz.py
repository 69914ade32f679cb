"""Hostile input for every reader: random bytes, truncation, wrong types, missing fields, deep nesting,
huge lines, non-UTF-8, empty files, bad configs.

Each read either succeeds, or fails with a clear error (a ValueError — never a RecursionError,
MemoryError, KeyError, IndexError, TypeError or UnicodeError — naming the file, and the line
where there is one), or counts the bad line as skipped when the reader is told to skip. A read
that takes longer than its time limit fails. Cases come from a seeded `random.Random` and are
bounded in number.
"""
import contextlib
import json
import random
import re
import signal
import tracemalloc

import ml_collections
import pytest

from configs import score as score_configs
from llm_embedder_jax import export, score, validation
from llm_embedder_jax.data import records
from tests.conftest import docstring_records
from tests.test_train import small_config

CASES = 150  # random files per reader
HUGE = 50 * 2**20  # bytes in the huge single lines


@contextlib.contextmanager
def time_limit(seconds):
    def expire(signum, frame):
        raise TimeoutError(f"still reading after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_or_clear_error(read, path, *, bad_line=None, seconds=30):
    """read(path), or the clear error it raised; anything else fails the test."""
    try:
        with time_limit(seconds):
            return read(path)
    except ValueError as e:
        message = str(e)
        assert not isinstance(e, UnicodeError), f"{type(e).__name__} escaped: {message[:300]}"
        assert path.name in message, f"the error does not name the file: {message[:300]}"
        if bad_line is not None:
            assert re.search(rf"(:|line ){bad_line}\b", message), f"not line {bad_line}: {message[:300]}"
        return e


# ----------------------------------------------------------------------------- hostile JSONL files

@pytest.fixture(scope="module")
def base_records(real_texts):
    """Records every reader accepts: qa with answers (score), a text field (embed), teacher scores (train)."""
    found = docstring_records(real_texts, count=6, candidates=4)
    for record in found:
        record["text"] = record["query"]
    return found


def random_value(rng, depth=0):
    kind = rng.choice(["int", "float", "bool", "null", "str", "list", "dict", "deep", "special"])
    if kind == "int":
        return rng.choice([0, -1, 2**70, rng.randint(-5, 5)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-320, float("nan"), float("inf")])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "str":
        return rng.choice(["", " ", "qa", "\x00", "é" * 3, "x" * 1000])
    if kind == "list" and depth < 3:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict" and depth < 3:
        return {rng.choice(["query", "pos", "a"]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if kind == "deep":
        value = "x"
        for _ in range(rng.choice([50, 500])):
            value = [value]
        return value
    return rng.choice([[], {}, ["a", 1], [None]])


FIELDS = ("query", "pos", "neg", "teacher_scores", "answers", "task", "text", "context")
KINDS = ("random bytes", "truncated", "wrong type", "missing field", "not UTF-8", "surrogate", "deep nesting",
         "not an object", "numbers", "byte order mark", "blank lines")


def hostile_file(rng, base):
    """(file bytes, kind, the 1-based line made bad or None when the file may be fine)."""
    lines = [json.dumps(r).encode() for r in base]
    kind = rng.choice(KINDS)
    i = rng.randrange(len(lines))
    bad = i + 1
    if kind == "random bytes":
        lines.insert(i, bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))).replace(b"\n", b"x"))
    elif kind == "truncated":
        whole = b"\n".join(lines) + b"\n"
        cut = rng.randrange(1, len(whole))
        content = whole[:cut]
        mid_line = not content.endswith(b"\n")
        return content, kind, content.count(b"\n") + 1 if mid_line else None
    elif kind in ("wrong type", "missing field"):
        record = dict(base[i])
        field = rng.choice(FIELDS)
        if kind == "wrong type":
            record[field] = random_value(rng)
        else:
            record.pop(field, None)
        lines[i] = json.dumps(record).encode()
    elif kind == "not UTF-8":
        cut = rng.randrange(2, len(lines[i]) - 2)
        lines[i] = lines[i][:cut] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) \
            + lines[i][cut:]
    elif kind == "surrogate":
        lines[i] = lines[i].replace(b'"query": "', b'"query": "\\ud800', 1)
    elif kind == "deep nesting":
        depth = rng.choice([2000, 100_000])
        lines[i] = b'{"query": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "not an object":
        lines[i] = json.dumps(rng.choice([[1, 2], "text", 5, None, True])).encode()
    elif kind == "numbers":
        number = rng.choice([b"1" + b"0" * 5000, b"1e999", b"NaN", b"-Infinity"])
        lines[i] = lines[i].replace(b'"teacher_scores": [0.0', b'"teacher_scores": [' + number, 1)
    elif kind == "byte order mark":
        lines[0] = b"\xef\xbb\xbf" + lines[0]
        bad = 1
    else:  # blank lines are not records: the file stays good
        lines.insert(i, rng.choice([b"", b"   ", b"\t", b"\r"]))
        bad = None
    return b"\n".join(lines) + b"\n", kind, bad


def score_config(skip):
    config = score_configs.get_config()
    config.skip_bad_records = skip
    return config


def reading_records(skip):
    def read(path):
        reader = records.read_jsonl(path, skip_bad=skip)
        found = list(reader)
        return len(found), sum(reader.skipped.values())
    return read


READERS = {
    "records": reading_records(False),
    "records, skipping": reading_records(True),
    "embed texts (.jsonl)": lambda path: export.read_texts(path, field="text"),
    "embed texts (.txt)": lambda path: export.read_texts(path, field="text"),
    "score": lambda path: score.scan_file(path, score_config(False)),
    "score, skipping": lambda path: score.scan_file(path, score_config(True)),
}


def suffix(reader):
    return ".txt" if reader.endswith("(.txt)") else ".jsonl"


@pytest.mark.parametrize("reader", READERS)
def test_hostile_jsonl_files(reader, base_records, tmp_path):
    rng = random.Random(f"jsonl {reader}")
    read = READERS[reader]
    outcomes = {}
    for case in range(CASES):
        content, kind, bad = hostile_file(rng, base_records)
        path = tmp_path / f"case{case}{suffix(reader)}"
        path.write_bytes(content)
        if reader.endswith("(.txt)"):  # one text a line: only bytes that are not UTF-8 can be bad
            bad = bad if kind in ("random bytes", "not UTF-8") else None
        result = read_or_clear_error(read, path, bad_line=bad)
        outcomes.setdefault(kind, []).append(type(result).__name__)
        if isinstance(result, Exception):
            assert bad is not None or kind in ("wrong type", "missing field", "numbers"), (kind, result)
            assert not reader.endswith("skipping") or "empty file" in str(result), (kind, result)
        elif reader == "records, skipping":
            records_read, skipped = result
            assert records_read + skipped == sum(1 for line in content.split(b"\n") if line.strip())
        elif reader == "embed texts (.txt)":
            assert len(result) == content.count(b"\n") + (not content.endswith(b"\n"))
    print(reader, {kind: f"{len(v)} cases, {v.count('tuple') + v.count('list') + v.count('int')} read"
                   for kind, v in sorted(outcomes.items())})


@pytest.mark.parametrize("reader", READERS)
def test_empty_and_blank_files(reader, tmp_path):
    for name, content in {"empty": b"", "blank": b"\n \n\t\n"}.items():
        path = tmp_path / f"{name}{suffix(reader)}"
        path.write_bytes(content)
        result = read_or_clear_error(READERS[reader], path)
        if reader.startswith("records"):
            assert isinstance(result, records.DataError) and "empty file" in str(result)
        elif reader.startswith("score"):
            assert result == (0, result[1])  # no records: the job then has nothing to score
        elif reader == "embed texts (.jsonl)":
            assert result == []


def test_huge_lines_keep_memory_sane(base_records, tmp_path):
    """A 50 MB line: read when it is valid, a clear error when not; memory a small multiple of the line."""
    good = json.dumps(base_records[0]).encode()
    cases = {
        "valid": (good + b"\n" + good.replace(b'"query": "', b'"query": "' + b"a" * HUGE, 1) + b"\n", None),
        "unterminated": (good + b"\n" + b'{"query": "' + b"a" * HUGE + b"\n", 2),
        "no newline": (good + b"\n" + b"x" * HUGE, 2),
    }
    readers = {k: v for k, v in READERS.items() if not k.endswith("(.txt)")}
    for name, (content, bad) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        for reader, read in readers.items():
            tracemalloc.start()
            try:
                result = read_or_clear_error(read, path, bad_line=None if reader.endswith("skipping") else bad,
                                             seconds=60)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 8 * HUGE, f"{reader} on {name}: peak {peak / 2**20:.0f} MiB"
            assert isinstance(result, Exception) == (bad is not None and not reader.endswith("skipping")), \
                (reader, name, result)
            if reader == "records" and bad is None:
                assert result == (2, 0)


@pytest.mark.parametrize("reader", ["records", "embed texts (.jsonl)", "score"])
def test_wrong_values_nested_as_deep_as_decodable(reader, tmp_path):
    """A wrong-typed value nested as deep as the reader can decode, or huge, is described in a few
    characters (describing it must not recurse past the limit, or print it whole)."""
    path = tmp_path / "deep.jsonl"
    for depth in range(1000, 0, -1):  # from too deep to decode, down to the deepest the reader decodes
        line = '{"query": ' + "[" * depth + "]" * depth + ', "pos": ["p"], "neg": ["n"], "task": "qa", ' \
               '"answers": ["a"], "text": ["' + "t" * 10**6 + '"]}'
        path.write_text(line + "\n")
        error = read_or_clear_error(READERS[reader], path, bad_line=1)
        assert isinstance(error, ValueError) and len(str(error)) < 600, (depth, str(error)[:1000])
        if "nested too deeply" not in str(error):
            break
    assert depth > 100


# ----------------------------------------------------------------------------- TFDS builder

def test_tfds_builder_never_leaves_a_partial_dataset(base_records, tmp_path):
    from llm_embedder_jax.data import tfds_builder
    good = [json.dumps(r).encode() for r in base_records]
    data_dir = tmp_path / "tfds"
    cases = {
        "bad_middle": (b"\n".join(good[:3] + [b'{"query": "q", "pos": '] + good[3:]) + b"\n", 4),
        "deep": (b"\n".join(good[:2] + [b"[" * 100_000 + b"]" * 100_000]) + b"\n", 3),
        "not_utf8": (b"\n".join(good[:5] + [good[5][:20] + b"\xff" + good[5][20:]]) + b"\n", 6),
        "empty": (b"", None),
    }
    for name, (content, bad) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        error = read_or_clear_error(lambda p: tfds_builder.build_tfds(p, data_dir), path, bad_line=bad, seconds=120)
        assert isinstance(error, ValueError), (name, error)
        # Nothing that reads as a finished dataset was left behind.
        assert not [p for p in data_dir.rglob("dataset_info.json")], name
    # Told to skip, the same bad file builds, with the skips counted in its metadata.
    path = tmp_path / "bad_middle.jsonl"
    directory = tfds_builder.build_tfds(path, data_dir, skip_bad=True)
    built = tfds_builder.TfdsRecords(directory)
    assert len(built) == 6 and built.skipped == {records.MALFORMED_JSON: 1}
    assert built[3]["query"] == base_records[3]["query"]


# ----------------------------------------------------------------------------- text folders (code_lrlm)

def test_code_folder_with_hostile_files(tmp_path, minilm_dir, real_texts):
    import transformers
    from llm_embedder_jax.data import code_lrlm
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    rng = random.Random(3)
    folder = tmp_path / "code"
    (folder / "pkg").mkdir(parents=True)
    good = "\n\n".join(real_texts[:40])
    files = {
        "good.py": good.encode(),
        "pkg/random.py": bytes(rng.randrange(256) for _ in range(5000)),
        "pkg/latin1.py": ("# café\n" + good).encode("latin-1", errors="replace"),
        "empty.py": b"",
        "blank.py": b"\n \n\t\n",
        "nul.py": good.replace("\n", "\x00\n").encode(),
        "crlf.py": good.replace("\n", "\r\n").encode(),
        "one_line.py": good.replace("\n", " ").encode(),
        "bom.py": b"\xef\xbb\xbf" + good.encode(),
        "truncated.py": good.encode("utf-8")[:-1] + "é".encode()[:1],
        "minified.py": b"x = 1; " * (HUGE // 7),  # one 50 MB line
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / "pkg" / "folder.py").mkdir()  # a folder with a file's name
    settings = code_lrlm.CodeLrlmSettings(source=str(folder), chunk_tokens=16, max_samples_per_file=3,
                                          test_fraction=0.0)
    tracemalloc.start()
    try:
        with time_limit(120):
            found, report = code_lrlm.generate_split("train", settings, tokenizer, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < HUGE  # the 50 MB file was not read
    assert report["files_read"] == len(files) and report[code_lrlm.TOO_LARGE] == 1
    assert report[code_lrlm.NOT_UTF8] == 3  # random bytes, latin-1 and the cut multi-byte character
    assert report[code_lrlm.TOO_SHORT] == 2  # empty and blank
    assert {r["file"] for r in found} == {"good.py", "nul.py", "crlf.py", "one_line.py", "bom.py"}
    for record in found:
        text = (folder / record["file"]).read_bytes().decode("utf-8")
        assert record["query"] in text and record["answers"][0] in text

    # A folder of nothing usable: an error, and no output file presented as complete.
    useless = tmp_path / "useless"
    useless.mkdir()
    for name in ("random.py", "empty.py"):
        (useless / name).write_bytes(files[f"pkg/{name}" if name == "random.py" else name])
    output = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="has no samples"):
        code_lrlm.write_jsonl(output, split="train", settings=code_lrlm.CodeLrlmSettings(
            source=str(useless), test_fraction=0.0), tokenizer=tokenizer, progress=False)
    assert not output.exists() and not list(tmp_path.glob(".out.jsonl.tmp-*"))


# ----------------------------------------------------------------------------- config files

def load_config_file(path):
    """The config of a file, loaded the way main.py loads --config."""
    from absl import flags
    from ml_collections import config_flags
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
    flag_values(["main.py", f"--config={path}"])
    return flag_values.config


def test_config_files_that_do_not_load(tmp_path):
    cases = {
        "syntax.py": ("import ml_collections\ndef get_config():\n    c = ml_collections.ConfigDict(\n    return c\n",
                      SyntaxError, r"syntax\.py, line 3"),
        "name.py": ("def get_config():\n    return undefined_name\n", NameError, "undefined_name"),
    }
    for name, (source, error, message) in cases.items():
        (tmp_path / name).write_text(source)
        with pytest.raises(error, match=message):
            load_config_file(tmp_path / name)
    (tmp_path / "plain_dict.py").write_text("def get_config():\n    return {'num_steps': 3}\n")
    with pytest.raises(validation.ConfigError, match="get_config\\(\\) returned a dict; expected an ml_collections"):
        validation.validate(load_config_file(tmp_path / "plain_dict.py"), "train")


def mutate(rng, data):
    """A random change to a config's plain-dict form: (kind, dotted path)."""
    paths = []

    def walk(node, prefix):
        for key, value in node.items():
            paths.append(f"{prefix}{key}")
            if isinstance(value, dict) and key != "settings":
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                walk(value[0], f"{prefix}{key}.0.")
    walk(data, "")
    path = rng.choice(paths)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = rng.choice(["wrong type", "typo", "missing", "unknown", "value"])
    value = node[last]
    if kind == "wrong type":
        node[last] = rng.choice([v for v in ("10", 3, 2.5, True, None, [1], {"a": 1}) if type(v) is not type(value)
                                 and not (isinstance(value, float) and type(v) is int)])
        if node[last] is None or (isinstance(value, (list, tuple)) and isinstance(node[last], list)):
            kind = "value"  # None or another list may be allowed
    elif kind == "typo":
        j = rng.randrange(len(last) - 1) if len(last) > 1 else 0
        swapped = last[:j] + last[j + 1:j + 2] + last[j] + last[j + 2:]
        node[swapped if swapped != last else last + "s"] = node.pop(last)
    elif kind == "missing":
        node.pop(last)
    elif kind == "unknown":
        node[f"{last}_extra"] = 1
    else:
        kind = "value"
        if isinstance(value, bool):
            node[last] = not value
        elif isinstance(value, (int, float)):
            node[last] = rng.choice([-1, 0, 10**9, float("nan")] if isinstance(value, float) else [-1, 0, 10**9])
        elif isinstance(value, str):
            node[last] = rng.choice(["", "nonsense", "qa", "/no/such/path"])
    return kind, path


@pytest.fixture(scope="module")
def config_sources(tiny_cls_checkpoint, docstring_jsonl):
    import configs.eval as eval_configs
    from configs import embed as embed_configs
    embed = embed_configs.get_config()
    embed.input = str(docstring_jsonl)
    return {"train": small_config(tiny_cls_checkpoint, docstring_jsonl), "score": score_configs.get_config(),
            "eval": eval_configs.get_config(), "embed": embed}


@pytest.mark.parametrize("mode", ["train", "score", "eval", "embed"])
def test_random_config_mutations(mode, config_sources):
    """Mistakes a config file can hold: refused as a ConfigError naming the field, or accepted."""
    rng = random.Random(f"config {mode}")
    counts = {}
    for _ in range(40):
        data = config_sources[mode].to_dict()
        kind, path = mutate(rng, data)
        config = ml_collections.ConfigDict(data)
        try:
            with time_limit(30):
                validation.validate(config, mode, check_data=mode == "train")
            outcome = "accepted"
        except validation.ConfigError as e:
            outcome = "refused"
            field = re.sub(r"\.(\d+)(\.|$)", r"[\1]\2", path.rsplit(".", 1)[0] if kind == "typo" else path)
            assert f"config.{field}" in str(e) or kind == "value", (kind, path, str(e))
        assert outcome == "refused" or kind == "value", (kind, path)
        counts[f"{kind} {outcome}"] = counts.get(f"{kind} {outcome}", 0) + 1
    print(mode, counts)
