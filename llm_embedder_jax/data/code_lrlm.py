"""Long-range language-model retrieval (lrlm) samples from local source files.

Every file is cut into chunks of `chunk_tokens` LLM tokens (the reward LLM's own
tokenizer). A sample at chunk i of a file is, in the released lrlm format:

    query    chunk i                      answers  [chunk i+1]
    context  chunks i-c .. i-1            pos      []
    neg      chunks e-m .. e-1            task     "lrlm"
             (the candidates, in file order; e = i-c-g)

with c = `context_chunks`, g = `gap_chunks` and m = `max_candidates` (0 =
every earlier chunk). The candidates are the nearest earlier chunks short of
the gap and stay consecutive, because the lrlm reward prompt
(`tasks.REWARD_TEMPLATES`, `score.parse_record`) follows candidate j with
candidate j+1 as its continuation: that holds only for a run of consecutive
chunks. The last candidate gets no continuation.

Why a gap: without one, the last candidate runs straight into the context
(its real continuation is the context), and the one before it brings two
chunks that do: on the standard library those two win on contiguity alone,
whatever they say, and an encoder that reads one chunk cannot see where it
sits. With g >= 1 every candidate is text from further back, and what it is
worth to the LLM depends on what it says. `file` and `chunk` (i) say where a
sample comes from; readers ignore them.

Chunks are cut from the original text at the character where token k·L starts
(`chunk_tokens` = L), so they are exact substrings, they join back into the
file, and a multi-byte character is never split. A file's trailing partial
chunk is dropped, so every answer has L tokens (perplexities compare).

Files: a folder (every file matching `pattern` below it) or a glob; by default
the running interpreter's standard library. Paths under a folder named in
`exclude_dirs` (test folders, site-packages, ...) are left out; files that are
not UTF-8, files too short for one sample and files over `max_file_bytes`
are counted and reported.
Each file goes to one split by a hash of its path relative to the root
(`split_of`), so the split of a file never depends on which other files exist.
Within a split, files are taken in hash order (a deterministic spread over the
whole tree, not the alphabetically first folder) until `max_files` of them
have given samples; a file gives at most `max_samples_per_file` samples, at
query positions spread evenly over the file.

    python -c "from llm_embedder_jax.data import code_lrlm; print(code_lrlm.write_jsonl('train.jsonl', split='train'))"
    directory = code_lrlm.build_tfds("~/tfds", source="/path/to/code")   # train/validation/test splits
"""
import collections
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import pathlib
import sysconfig

import numpy as np

from llm_embedder_jax.atomic import atomic_file

SPLITS = ("train", "validation", "test")
DEFAULT_EXCLUDE_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
NOT_UTF8 = "not UTF-8"
TOO_SHORT = "too short"
TOO_LARGE = "too large"
BLANK = "blank query or answer"


@dataclasses.dataclass(frozen=True)
class CodeLrlmSettings:
    """How files become samples, and which files each split takes."""
    source: str = "stdlib"  # a folder, a glob ("src/**/*.py"), or "stdlib" (this interpreter's standard library)
    pattern: str = "*.py"  # files taken below a folder source
    exclude_dirs: tuple = DEFAULT_EXCLUDE_DIRS  # path components that leave a file out
    chunk_tokens: int = 64  # LLM tokens per chunk
    context_chunks: int = 1  # chunks right before the query given as `context` (never candidates)
    gap_chunks: int = 1  # chunks between the candidates and the context, in neither (see the module doc)
    min_candidates: int = 2  # a query position needs at least this many earlier chunks as candidates
    max_candidates: int = 8  # nearest earlier chunks offered as candidates (0 = all)
    max_samples_per_file: int = 4  # query positions per file, spread evenly (0 = every position)
    max_files: int = 0  # files with samples per split, in hash order (0 = all)
    validation_fraction: float = 0.0  # share of files (by path hash) in the validation split
    test_fraction: float = 0.1  # share of files (by path hash) in the test split
    # Larger files are skipped and counted (generated or minified code): tokenizing one costs time and
    # memory in proportion, about 20 s and 0.5 GB for 2 MB (0 = no cap).
    max_file_bytes: int = 1 << 20

    def __post_init__(self):
        if self.chunk_tokens < 1 or min(self.context_chunks, self.gap_chunks) < 0 or self.min_candidates < 1:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} and min_candidates={self.min_candidates} must be "
                             f">= 1, context_chunks={self.context_chunks} and gap_chunks={self.gap_chunks} >= 0")
        if min(self.max_candidates, self.max_samples_per_file, self.max_files, self.max_file_bytes) < 0:
            raise ValueError("max_candidates, max_samples_per_file, max_files and max_file_bytes must be >= 0 "
                             "(0 = no cap)")
        if self.max_candidates and self.max_candidates < self.min_candidates:
            raise ValueError(f"max_candidates={self.max_candidates} is below min_candidates={self.min_candidates}")
        fractions = (self.validation_fraction, self.test_fraction)
        if min(fractions) < 0 or sum(fractions) >= 1:
            raise ValueError(f"validation_fraction and test_fraction must be >= 0 and leave some files for "
                             f"training, got {fractions}")


def resolve_source(source):
    """(root folder, the files of a glob source or None for a folder); `source`: "stdlib", a folder or a glob."""
    if source == "stdlib":
        source = sysconfig.get_paths()["stdlib"]
    if glob.has_magic(source):
        # The root is the glob's leading folders without wildcards: paths are made relative to it.
        parts = pathlib.Path(source).parts
        fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
        root = pathlib.Path(*parts[:fixed]) if fixed else pathlib.Path(".")
        return root, sorted(p for p in map(pathlib.Path, glob.glob(source, recursive=True)) if p.is_file())
    root = pathlib.Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"source {source!r} is neither a folder nor a glob")
    return root, None


def source_files(settings):
    """(root, [(relative posix path, path)]) of every file of the source, sorted, minus excluded folders."""
    root, files = resolve_source(settings.source)
    if files is None:
        files = sorted(p for p in root.rglob(settings.pattern) if p.is_file())
    excluded = set(settings.exclude_dirs)
    kept = []
    for path in files:
        relative = path.relative_to(root)
        if excluded & set(relative.parts[:-1]):
            continue
        kept.append((relative.as_posix(), path))
    if not kept:
        raise FileNotFoundError(f"no files in source {settings.source!r} (pattern {settings.pattern!r}, "
                                f"excluding folders {sorted(excluded)})")
    return root, kept


def path_hash(relative_path):
    """A number in [0, 1) from a relative path: the file's place in the split and in the file order."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(relative_path, settings):
    u = path_hash(relative_path)
    if u < settings.test_fraction:
        return "test"
    if u < settings.test_fraction + settings.validation_fraction:
        return "validation"
    return "train"


def chunk_text(text, tokenizer, *, chunk_tokens):
    """The full chunks of `text`: exact substrings cut where token k·chunk_tokens starts."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [offsets[k][0] for k in range(0, len(offsets), chunk_tokens)] + [None]
    num_full = len(offsets) // chunk_tokens
    # The end of the last full chunk is where the next token starts (or the end of the text).
    ends = starts[1:num_full] + [offsets[num_full * chunk_tokens][0] if len(offsets) > num_full * chunk_tokens
                                 else len(text)]
    return [text[start:end] for start, end in zip(starts[:num_full], ends)]


def query_positions(num_chunks, settings):
    """The chunk indices used as queries, ascending: every valid one, or n at the middles of n equal parts.

    Middles rather than both ends, so a single sample per file sits mid-file
    rather than at its first valid chunk (the one with the fewest candidates).
    """
    first = settings.context_chunks + settings.gap_chunks + settings.min_candidates
    last = num_chunks - 2  # the answer is the chunk after the query
    if last < first:
        return []
    n = settings.max_samples_per_file
    if not n or last - first + 1 <= n:
        return list(range(first, last + 1))
    middles = first + (np.arange(n) + 0.5) * (last - first + 1) / n
    return [int(p) for p in np.unique(np.floor(middles).astype(int))]


def file_samples(chunks, relative_path, settings, counts):
    """The records of one file's chunks."""
    records = []
    for i in query_positions(len(chunks), settings):
        query, answer = chunks[i], chunks[i + 1]
        if not query.strip() or not answer.strip():
            counts[BLANK] += 1
            continue
        end = i - settings.context_chunks - settings.gap_chunks
        start = max(0, end - settings.max_candidates) if settings.max_candidates else 0
        records.append({"query": query, "answers": [answer], "pos": [], "neg": chunks[start:end],
                        "context": "".join(chunks[i - settings.context_chunks:i]), "task": "lrlm",
                        "file": relative_path, "chunk": i})
    return records


def load_chunk_tokenizer(tokenizer="smollm2"):
    """The tokenizer that measures chunks: "smollm2" (the bundled reward LLM's) or an LLM folder / .gguf."""
    from llm_embedder_jax import assets, llm
    return llm.load_tokenizer(assets.smollm2_gguf() if tokenizer == "smollm2" else tokenizer)


def generate_split(split, settings, tokenizer, *, progress=True):
    """(records, report) of one split; the report counts the files read, used and skipped, and the samples."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    _, files = source_files(settings)
    mine = sorted((path_hash(rel), rel, path) for rel, path in files if split_of(rel, settings) == split)
    counts = collections.Counter()
    not_utf8 = []
    records = []
    from tqdm.auto import tqdm
    with tqdm(total=settings.max_files or len(mine), desc=f"{split} files", unit="file",
              disable=not progress) as bar:
        for _, relative, path in mine:
            if settings.max_files and counts["files_used"] >= settings.max_files:
                break
            counts["files_read"] += 1
            if settings.max_file_bytes and path.stat().st_size > settings.max_file_bytes:
                counts[TOO_LARGE] += 1
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                counts[NOT_UTF8] += 1
                not_utf8.append(f"{relative} ({e.reason} at byte {e.start})")
                continue
            chunks = chunk_text(text, tokenizer, chunk_tokens=settings.chunk_tokens)
            found = file_samples(chunks, relative, settings, counts)
            if not found:
                counts[TOO_SHORT] += 1
                continue
            counts["files_used"] += 1
            counts["samples"] += len(found)
            counts["candidates"] += sum(len(r["neg"]) for r in found)
            records += found
            bar.update(1)
    report = {"split": split, "files_in_split": len(mine),
              **{k: counts[k] for k in ("files_read", "files_used", "samples", "candidates", NOT_UTF8, TOO_SHORT,
                                        TOO_LARGE, BLANK)},
              "not_utf8_files": not_utf8[:100]}
    return records, report


def write_jsonl(path, *, split="train", settings=None, tokenizer="smollm2", progress=True):
    """Writes one split as lrlm JSONL (atomically) and returns its report.

    `tokenizer` is a loaded tokenizer, "smollm2", or an LLM folder / .gguf path.
    """
    settings = settings or CodeLrlmSettings()
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_chunk_tokenizer(tokenizer)
    records, report = generate_split(split, settings, tokenizer, progress=progress)
    if not records:
        raise ValueError(f"split {split!r} of {settings.source!r} has no samples: {report}")
    if report[NOT_UTF8]:
        logging.warning("%s: skipped %d files that are not UTF-8, e.g. %s", split, report[NOT_UTF8],
                        report["not_utf8_files"][0])
    with atomic_file(path, "wb") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    return report


# ----------------------------------------------------------------------------- TFDS

def _tfds():
    # Imported on use: the demo and the JSONL path do not need TFDS.
    import tensorflow_datasets as tfds
    return tfds


@functools.lru_cache(maxsize=None)
def _builder_class():
    """(builder, config class), defined once: TFDS registers builders by class name."""
    tfds = _tfds()
    from llm_embedder_jax.data import tfds_builder

    @dataclasses.dataclass
    class CodeLrlmConfig(tfds.core.BuilderConfig):
        settings: CodeLrlmSettings = dataclasses.field(default_factory=CodeLrlmSettings)
        tokenizer: str = "smollm2"

    class PythonCodeLrlm(tfds.core.GeneratorBasedBuilder):
        """lrlm samples of local source files: train / validation / test splits by file."""

        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIG_CLASS = CodeLrlmConfig
        code_path = None  # nothing to download: no checksums file to look for

        def _info(self):
            # The fields of the JSONL builder (so tfds_builder.TfdsRecords reads the train split),
            # plus where each sample comes from.
            features = {name: tfds.features.Text() for name in (*tfds_builder.TEXT_FIELDS,
                                                                 *tfds_builder.JSON_FIELDS, "file")}
            features["chunk"] = tfds.features.Scalar(dtype=np.int64)
            return tfds.core.DatasetInfo(
                builder=self, description="lrlm samples (query, next chunk, earlier chunks) of local source files.",
                features=tfds.features.FeaturesDict(features), disable_shuffling=True,
                metadata=tfds.core.MetadataDict())

        def _split_generators(self, dl_manager):
            del dl_manager
            settings = self.builder_config.settings
            splits = ["train"] + [s for s, f in (("validation", settings.validation_fraction),
                                                 ("test", settings.test_fraction)) if f > 0]
            tokenizer = load_chunk_tokenizer(self.builder_config.tokenizer)
            return {split: self._generate_examples(split, tokenizer) for split in splits}

        def _generate_examples(self, split, tokenizer):
            records, report = generate_split(split, self.builder_config.settings, tokenizer)
            self.info.metadata[split] = report
            for index, record in enumerate(records):
                example = tfds_builder.encode_record({**dict.fromkeys(tfds_builder.JSON_FIELDS), **record,
                                                      "source": f"{record['file']}#{record['chunk']}"})
                yield index, {**example, "file": record["file"], "chunk": record["chunk"]}

    return PythonCodeLrlm, CodeLrlmConfig


def build_tfds(data_dir, *, settings=None, tokenizer="smollm2", name=None):
    """Builds (or reuses) the `python_code_lrlm` dataset; returns its versioned folder.

    The config name carries a hash of the settings, so other settings never
    reuse a dataset built under these. Splits: train, and validation / test
    when their fractions are > 0. Each split's counts are in the metadata.
    """
    settings = settings or CodeLrlmSettings()
    builder_class, config_class = _builder_class()
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(settings), tokenizer], sort_keys=True).encode())
    name = name or f"{_slug(settings.source)}_{digest.hexdigest()[:10]}"
    builder = builder_class(config=config_class(name=name, settings=settings, tokenizer=str(tokenizer)),
                            data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return pathlib.Path(builder.data_dir)


def _slug(source):
    words = "".join(c if c.isalnum() else " " for c in pathlib.Path(source).name.lower()).split()
    name = "_".join(words) or "source"
    return name if name[0].isalpha() else f"d_{name}"


def read_tfds(directory, split):
    """The records of one split of a built dataset, as `generate_split` makes them."""
    from llm_embedder_jax.data import tfds_builder
    source = _tfds().builder_from_directory(os.fspath(directory)).as_data_source(split=split)
    fields = ("query", "answers", "pos", "neg", "context", "task")
    return [{**{k: record[k] for k in fields}, "file": example["file"].decode("utf-8"), "chunk": int(example["chunk"])}
            for example in map(source.__getitem__, range(len(source)))
            for record in [tfds_builder.decode_record(example)]]
