"""JSONL → TFDS (array_record), read back by random access without TensorFlow.

One TFDS dataset per input file, one `train` split, in file order (shuffling
is the pipeline's job, and file order keeps indices and max_sample_num the
same as reading the JSONL directly). Every record field is stored as text:
strings as they are, lists as JSON. Each record keeps its provenance
("file:line") so errors found later still point at the source line.

    directory = build_tfds("qa.jsonl", "~/tfds")          # .../llm_embedder_jsonl/qa/1.0.0
    records = TfdsRecords(directory)                      # len(), records[i] -> record dict
    tfds.data_source("llm_embedder_jsonl/qa", data_dir="~/tfds")["train"][0]   # raw bytes

A prepared dataset is reused as it is: delete its folder to rebuild it.
"""
import dataclasses
import json
import os
import pathlib
import re

import tensorflow_datasets as tfds

from llm_embedder_jax.data import records as records_lib

# Stored as JSON text: the nested or optional fields.
JSON_FIELDS = ("pos", "neg", "history", "teacher_scores", "answers", "context")
TEXT_FIELDS = ("task", "query", "source")


@dataclasses.dataclass
class JsonlConfig(tfds.core.BuilderConfig):
    path: str = ""  # the JSONL file
    task: str | None = None  # for records without a `task` field
    skip_bad: bool = False  # count bad lines instead of failing (counts land in the dataset metadata)


class LlmEmbedderJsonl(tfds.core.GeneratorBasedBuilder):
    """The released LLM-Embedder JSONL training format, one config per file."""

    VERSION = tfds.core.Version("1.0.0")
    # No code folder: nothing to download, so no checksums file to look for next
    # to this module (tfds 4.9's lookup also needs `importlib_resources`, which
    # Python >= 3.9 does not install).
    code_path = None

    def _info(self):
        # Explicit: a builder outside a TFDS package has no metadata files to read.
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLM-Embedder training records (query, candidates, teacher scores).",
            features=tfds.features.FeaturesDict(
                {name: tfds.features.Text() for name in TEXT_FIELDS + JSON_FIELDS}),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        config = self.builder_config
        reader = records_lib.read_jsonl(config.path, task=config.task, skip_bad=config.skip_bad)
        for index, record in enumerate(reader):
            yield index, encode_record(record)
        self.info.metadata["skipped"] = dict(reader.skipped)


def encode_record(record):
    example = {name: record[name] for name in TEXT_FIELDS}
    example.update({name: json.dumps(record[name], ensure_ascii=False) for name in JSON_FIELDS})
    return example


def decode_record(example):
    """A data-source example (text as bytes) → the reader's record dict."""
    record = {name: example[name].decode("utf-8") for name in TEXT_FIELDS}
    record.update({name: json.loads(example[name]) for name in JSON_FIELDS})
    return record


def config_name(path):
    """A valid TFDS config name from a file name: 'MS-MARCO.train.jsonl' → 'ms_marco_train'."""
    stem = pathlib.Path(path).name.split(".jsonl")[0].split(".json")[0]
    name = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
    return name if name[:1].isalpha() else f"d_{name}"


def build_tfds(jsonl_path, data_dir, *, name=None, task=None, skip_bad=False):
    """Converts one JSONL file into a TFDS dataset; returns its (versioned) directory."""
    jsonl_path = os.fspath(jsonl_path)
    if not os.path.isfile(jsonl_path):
        raise FileNotFoundError(f"no such JSONL file: {jsonl_path}")
    config = JsonlConfig(name=name or config_name(jsonl_path), path=jsonl_path, task=task, skip_bad=skip_bad)
    builder = LlmEmbedderJsonl(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return pathlib.Path(builder.data_dir)


def is_tfds_dir(path):
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


class TfdsRecords:
    """Random access to the records of a built dataset: len(), [i] → record dict."""

    def __init__(self, directory):
        directory = os.fspath(directory)
        if not is_tfds_dir(directory):
            raise FileNotFoundError(f"{directory} is not a prepared TFDS dataset (no dataset_info.json); "
                                    f"pass the versioned folder that build_tfds returns")
        builder = tfds.builder_from_directory(directory)
        self.directory = directory
        self.skipped = dict(builder.info.metadata.get("skipped", {})) if builder.info.metadata else {}
        self._source = builder.as_data_source(split="train")

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        return decode_record(self._source[index])
