"""Operator and development commands; they use the pipeline, never the reverse."""
