"""Benchmarks of the harvester, the store and the trainer; see benchmarks/README.md."""
