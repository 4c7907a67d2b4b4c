"""Data, formatting and metrics per task family: GLUE, local files and the built-in tweet-sentiment set."""

from __future__ import annotations

import os

from leantune.tasks.core import SPLITS, DataError, Example, Task
from leantune.tasks.glue import GLUE_TASKS, load_glue

BUILTIN_TASKS = ("tweets",)


def task_names() -> list[str]:
    """Every task name ``get_task`` accepts."""
    return [*BUILTIN_TASKS, *GLUE_TASKS]


def get_task(name: str, glue_dir: str | os.PathLike | None = None) -> Task:
    """A built-in task (``tweets``) or a GLUE task (from ``glue_dir`` if given, else the hub)."""
    if name == "tweets":
        from leantune.tasks.builtin import tweet_sentiment_task

        return tweet_sentiment_task()
    key = name.lower().replace("-", "")
    if key in GLUE_TASKS:
        return load_glue(key, glue_dir)
    raise DataError(f"unknown task {name!r}; tasks: {', '.join(task_names())} (or pass local files with --data)")


__all__ = ["SPLITS", "DataError", "Example", "Task", "get_task", "task_names"]
