"""Embed a text file (one text per line) or a JSONL file into a float32 .npy.

  python main.py --mode=embed --config=configs/embed.py --workdir=runs/embed \
      --config.input=texts.txt --config.task=qa --config.kind=key

Variants: `configs/embed.py:bf16` computes in bfloat16.
"""
import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.mode = "embed"
    config.workdir = "runs/embed"
    # Encoder folder (Hugging Face / sentence-transformers); empty = the bundled all-MiniLM-L6-v2.
    config.model = ""
    # Input: a .txt file (one text per line) or .jsonl/.json (one object per line).
    config.input = ""
    # For JSONL input: the field holding the text.
    config.text_field = "text"
    # One of qa, convsearch, chat, lrlm, icl, tool; empty = no instruction.
    config.task = ""
    # "query" or "key": which of the task's two instructions to prepend.
    config.kind = "query"
    config.batch_size = 256
    # Tokens per text, special tokens included; capped by the model's own limit.
    config.max_length = 256
    # "float32" or "bfloat16" compute (parameters stay float32).
    config.dtype = "float32"
    # Output .npy; empty = <workdir>/embeddings.npy.
    config.output = ""
    if arg == "bf16":
        config.dtype = "bfloat16"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/embed.py: expected '' or 'bf16'")
    return config
