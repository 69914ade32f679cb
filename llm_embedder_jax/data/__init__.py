"""Training data: the released JSONL format → samples → homogeneous, tokenised global batches.

    records       read_jsonl, validation, DataError (file, line, field)
    samples       per-task sample construction (positive, negatives, teacher scores)
    tfds_builder  JSONL → TFDS (array_record), random access without TensorFlow
    mixture       the seeded schedule of datasets
    pipeline      make_train_iterator: the grain pipeline the train loop consumes
"""
