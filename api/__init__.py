"""fedsqueeze: api."""
