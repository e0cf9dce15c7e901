"""The pipeline file: models, compact policy syntax, and the loader that reports errors with positions."""
