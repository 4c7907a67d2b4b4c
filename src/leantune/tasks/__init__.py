"""Data, formatting and metrics per task family: GLUE, local files and the built-in offline sets (tweet sentiment,
BBC News topics); several tasks of one run (:class:`MultiTask`). Image classification data (a folder of class
sub-folders, or a table of image paths) is :func:`leantune.tasks.images.load_images` (imported from its module:
it brings in Pillow and transformers' image stack)."""

from __future__ import annotations

import os

from leantune.tasks.core import SPLITS, DataError, Example, Task
from leantune.tasks.glue import GLUE_TASKS, load_glue
from leantune.tasks.multitask import MultiTask

BUILTIN_TASKS = ("tweets", "bbc")


def task_names() -> list[str]:
    """Every task name ``get_task`` accepts."""
    return [*BUILTIN_TASKS, *GLUE_TASKS]


def canonical_name(name: str) -> str:
    """The name of the task ``get_task(name)`` loads (GLUE names are lower-cased without dashes: SST-2 -> sst2)."""
    key = name.lower().replace("-", "")
    return key if name not in BUILTIN_TASKS and key in GLUE_TASKS else name


def get_task(name: str, glue_dir: str | os.PathLike | None = None) -> Task:
    """A built-in task (``tweets``, ``bbc``) or a GLUE task (from ``glue_dir`` if given, else the hub)."""
    if name == "tweets":
        from leantune.tasks.builtin import tweet_sentiment_task

        return tweet_sentiment_task()
    if name == "bbc":
        from leantune.tasks.builtin import bbc_news_task

        return bbc_news_task()
    key = canonical_name(name)
    if key in GLUE_TASKS:
        return load_glue(key, glue_dir)
    raise DataError(f"unknown task {name!r}; tasks: {', '.join(task_names())} (or pass local files with --data)")


__all__ = ["SPLITS", "DataError", "Example", "MultiTask", "Task", "canonical_name", "get_task", "task_names"]
