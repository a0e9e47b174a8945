"""Learning tasks: data loading, partitioning, model, loss, metrics."""

from tasks.base import TASKS, Task, load_task, register_task

__all__ = ["TASKS", "Task", "load_task", "register_task"]
