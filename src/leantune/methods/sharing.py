"""What task-aware methods share: the ``tasks`` and ``sharing`` options, the ``task`` per-call input, and the
sub-layer positions adapters are placed at.

``sharing``: ``single`` (one set of weights for every task, used with a task prefix in the text), ``multiple``
(one per task), ``half`` (adapters only: one projection shared by all tasks, the other per task).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leantune.backbones import Backbone, Block
from leantune.config import ConfigError, MethodConfig, check_choice, option
from leantune.context import CallInput

SHARING = ("single", "multiple", "half")
# Where adapters go: after these sub-layers' outputs, before their dropout and residual add (the architecture
# map's Block.sublayer_output).
PLACEMENT_SUBLAYERS = {
    "houlsby": ("attention", "feed_forward"),
    "pfeiffer": ("feed_forward",),
    "all": ("attention", "cross_attention", "feed_forward"),
}


@dataclass
class TaskSharingConfig(MethodConfig):
    """The task options of a task-aware method."""

    tasks: list[str] | None = option(
        None, "Task names this model serves; every forward/generate call then passes task=<name or index>. "
              "None = one task, no task input needed.")
    sharing: str = option("single", "single = one set of weights for every task; multiple = one per task.")

    def validate(self) -> None:
        check_choice(self, "sharing", self.sharing_choices())
        check_task_names(self)
        if self.sharing != "single" and self.tasks is None:
            raise ConfigError(f"{type(self).__name__}.sharing={self.sharing!r} needs the task names: set tasks=[...]")

    @classmethod
    def sharing_choices(cls) -> tuple[str, ...]:
        return SHARING[:2]

    def task_input(self) -> tuple[CallInput, ...]:
        """The ``task`` per-call input: required when weights differ per task, accepted (and unused) otherwise."""
        required = self.sharing != "single" and len(self.tasks or ()) > 1
        choices = tuple(self.tasks) if self.tasks else None
        return (CallInput("task", "the batch's task name or index", required=required, choices=choices),)


def check_task_names(config: MethodConfig) -> None:
    """Raise :class:`ConfigError` unless ``config.tasks`` is None or a non-empty list of distinct names."""
    tasks = config.tasks
    if tasks is not None and (not tasks or len(set(tasks)) != len(tasks)):
        raise ConfigError(f"{type(config).__name__}.tasks must be a non-empty list of distinct names, got {tasks!r}")


def placement_positions(backbone: Backbone, placement: str) -> list[tuple[Block, str, str, nn.Module]]:
    """``(block, sub-layer, module name, module)`` for every adapter position of ``placement``, in forward order."""
    return [(block, sublayer, *found) for block in backbone.blocks() for sublayer in PLACEMENT_SUBLAYERS[placement]
            if (found := block.sublayer_output(sublayer)) is not None]
