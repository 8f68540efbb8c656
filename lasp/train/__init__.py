"""The trainer: `python -m lasp.train --config FILE [--set a.b=v ...] [--dry-run]` (docs/design.md, "The trainer")."""
