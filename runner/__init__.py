"""edarun: a declarative event-pipeline runner for the nine event-driven architecture patterns."""

__version__ = "0.1.0"
