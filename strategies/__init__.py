"""fedsqueeze: strategies."""
