"""`make bench`: every benchmark of the project, results in benchmarks/results/<date>.json."""
