"""Reading Hugging Face safetensors checkpoints (one file or a sharded index) as numpy arrays.

Read directly (memory-mapped) rather than through `safetensors.numpy`, whose API
cannot hold bfloat16 — the dtype most large checkpoints ship in.
"""
import json
import pathlib

import ml_dtypes
import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
          "I64": np.int64, "I32": np.int32}


def read_file(path):
    """name -> numpy array (memory-mapped) of one .safetensors file."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    data = np.memmap(path, np.uint8, "r", offset=8 + header_size)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arrays[name] = data[start:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
    return arrays


def read_folder(folder):
    """All tensors of model.safetensors, or of every shard named in model.safetensors.index.json."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors checkpoints are supported)")
    tensors = {}
    for name in files:
        tensors.update(read_file(folder / name))
    return tensors
