"""The trainer: `python -m lasp.train --config FILE [--set a.b=v ...] [--dry-run]` (DESIGN.md section 8)."""
