"""Quarry from Python: `from quarry import Quarry`; `Quarry.from_env().run(...)` returns a Job."""

from quarry.client import Job, Preview, Quarry

__all__ = ["Job", "Preview", "Quarry"]
