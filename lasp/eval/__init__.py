"""Evaluation of trained models: loss by position (`python -m lasp.eval positions`)."""

from lasp.parallel.positions import buckets, document_rows, position_losses

__all__ = ["buckets", "document_rows", "position_losses"]
