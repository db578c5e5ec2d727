"""Registering datasets: manifests, WebDataset shards, catalog tables and image locations (used by
the producer to plan an ingest and by the transform pool to run its units)."""
