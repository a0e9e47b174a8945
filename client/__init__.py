"""fedsqueeze: client."""
