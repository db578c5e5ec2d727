"""The peers' side of `python -m bench.peers`: each job as its library's users write it, run with
the peers' own environment (`make .venv-peers`), never imported by Quarry."""
