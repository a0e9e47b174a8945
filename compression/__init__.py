"""fedsqueeze: compression."""
