"""fedsqueeze: tasks."""
