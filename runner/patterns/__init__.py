"""The pattern policies: one module per pattern, each owning its YAML key and its runtime piece."""
