"""weft's benchmarks: `python -m bench [NAME...]` prints a table and records it in RESULTS.md."""
