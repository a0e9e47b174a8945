"""fedsqueeze: server."""
