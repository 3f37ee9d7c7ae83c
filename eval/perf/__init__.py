"""Speed and memory benchmarks: each prints a table, ratios against a baseline measured in the same run."""
