"""Command-line tools: model table, benchmarks."""
