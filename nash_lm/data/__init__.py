"""Data sources.

- `records`: the record schemas (prompt, SFT pair, preference pair with optional soft label) and validation.
- `sources`: JSONL and ArrayRecord readers with file:line bad-row reports (skip with a count, or reject), a grain
  random-access source, the grain pipeline with per-host sharding, and global batches from per-host data.
- `tokenizer`: SentencePiece (trained in-process, cached) and Hugging Face tokenizer.json behind one interface.
- `features`: records -> fixed-length token arrays in the layout of the training step.
- `adapters`: optional seqio Task / tfds readers (TensorFlow imported lazily; the `[seqio]` extra).
- `synthetic`: the deterministic synthetic sources used by tests and the tiny pipeline.
"""
