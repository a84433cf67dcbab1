"""The teacher side of the pipeline, one module per stage:

  teacher_client   sample chains of thought from any OpenAI-compatible server (`specialize teacher`)
  teacher_sources  import other teachers' data: GSM8K gold, PaLM SVAMP, the paper's Codex pickles
  teacher_data     the `specialize_jax.teacher/1` JSONL schema: reader, validator, atomic writer
  teacher_filter   keep correct samples, cut after their answer line (`specialize teacher_filter`)
  alignment        move per-token top-k onto student pieces by DTW (`specialize align`)
  aligned_data     the `specialize_jax.aligned/1` JSONL schema of `alignment`'s output
  teacher_features aligned rows as the dense `[targets, k]` features the training tasks carry
  prepare          teacher (+ aligned) file -> a prepared training set (`specialize prepare`)
  prepared_data    the prepared set on disk (ArrayRecord shards) and its SeqIO source
  synthetic        the demo's teacher: seeded multi-step arithmetic problems with gold chains

It may import `specialize_jax.data` (formats, splits, vocabulary, feature converters), never the
model, training or evaluation layers.
"""
