"""fedsqueeze: migrations."""
