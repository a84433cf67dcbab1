"""Data layer: readers, formats, teacher-data schema, answer metrics, feature converters (no Flax)."""
