"""Length buckets: pad each batch to a few fixed lengths, not to one global maximum.

Real batches have very uneven lengths; padding everything to the maximum wastes
most of the compute, while padding to the exact batch maximum recompiles for
every new length. A small ladder of bucket lengths keeps both low.
"""
import numpy as np


def bucket_length(n, *, max_length):
    """Smallest bucket >= n: multiples of 16 up to 64, of 32 up to 256, then of 64."""
    if n <= 0:
        n = 1
    if n <= 64:
        step = 16
    elif n <= 256:
        step = 32
    else:
        step = 64
    return int(min(-(-n // step) * step, max_length))


def length_sorted_batches(lengths, batch_size):
    """Index arrays of batches of similar length, longest first (fail fast on memory)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(token_lists, *, max_length, pad_id=0, rows=None):
    """Right-pads token lists to their bucket; returns (ids, mask) int32 arrays.

    `rows` pads the batch dimension too (with empty rows), so the last, smaller
    batch reuses a compiled shape.
    """
    longest = max((len(t) for t in token_lists), default=1)
    width = bucket_length(longest, max_length=max_length)
    rows = rows or len(token_lists)
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for i, toks in enumerate(token_lists):
        toks = toks[:width]
        ids[i, :len(toks)] = toks
        mask[i, :len(toks)] = 1
    return ids, mask
