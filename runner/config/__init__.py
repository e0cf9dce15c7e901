"""The pipeline file: models, compact policy syntax, and a loader reporting errors by position."""
