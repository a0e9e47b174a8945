"""fedsqueeze: benchmarks."""
