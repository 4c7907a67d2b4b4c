"""Several tasks trained together in one run (VL-Adapter's multi-task setting).

Each task keeps its own splits, label space, metric and text-to-text form, and may have its own batch size. A
model with a classification or regression head serves several tasks through one joint head with a slice of
outputs per task (:meth:`MultiTask.head_slices`): a task's loss and predictions read only its own slice, so each
slice is that task's own linear head. Encoder-decoder models need no head: each task's label words are generated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from leantune.errors import ConfigError
from leantune.tasks.core import DataError, Task


@dataclass
class MultiTask:
    """The tasks of one run, in order, and their batch sizes (``batch_sizes[name]``; a task without one uses the
    run's ``TrainConfig.batch_size``). A single task is the one-task case."""

    tasks: list[Task]
    batch_sizes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise DataError("a run needs at least one task")
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise DataError(f"two tasks are named {task.name!r}; give each task of a run its own name")
            seen.add(task.name)
        for name, size in self.batch_sizes.items():
            if name not in seen:
                raise ConfigError(f"batch size given for task {name!r}, which is not one of the run's tasks "
                                  f"({', '.join(self.names)})")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"task {name!r}: batch_size must be a positive integer, got {size!r}")

    @classmethod
    def of(cls, tasks: Task | MultiTask) -> MultiTask:
        """``tasks`` as a :class:`MultiTask` (a single :class:`Task` becomes the one-task case)."""
        return tasks if isinstance(tasks, MultiTask) else cls([tasks])

    @property
    def names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def batch_size(self, name: str, default: int) -> int:
        return self.batch_sizes.get(name, default)

    @property
    def num_labels(self) -> int:
        """Outputs of a joint classification/regression head: the tasks' label counts added up."""
        return sum(task.num_labels for task in self.tasks)

    def head_slices(self) -> dict[str, tuple[int, int]]:
        """``{task: (start, stop)}``: each task's outputs in the joint head, in task order."""
        slices, start = {}, 0
        for task in self.tasks:
            slices[task.name] = (start, start + task.num_labels)
            start += task.num_labels
        return slices

    def batch_task_names(self) -> set[str]:
        """The task names the batches carry to a task-aware method (``Example.task``, else the task's name)."""
        return {example.task or task.name for task in self.tasks for split in task.splits.values()
                for example in split}

    def subset(self, sizes: dict[str, int | None]) -> MultiTask:
        """Every task cut to its first ``sizes[split]`` examples per split (:meth:`Task.subset`)."""
        return MultiTask([task.subset(sizes) for task in self.tasks], dict(self.batch_sizes))

    def describe(self) -> str:
        if len(self.tasks) == 1:
            return self.tasks[0].describe()
        return f"{len(self.tasks)} tasks: " + "; ".join(task.describe() for task in self.tasks)


def check_method_tasks(method_tasks: Sequence[str], run_tasks: Sequence[str], option: str = "tasks") -> None:
    """Refuse a method built for other tasks than the run trains, naming both lists."""
    if sorted(map(str, method_tasks)) != sorted(run_tasks):
        raise ConfigError(f"the method option {option}={list(method_tasks)} does not match the run's tasks "
                          f"{list(run_tasks)}; leave {option} unset (the run sets it) or list the run's tasks")
