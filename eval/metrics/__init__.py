"""Local `evaluate` metric modules: each folder loads offline with `evaluate.load("<repo>/eval/metrics/<name>")`."""
