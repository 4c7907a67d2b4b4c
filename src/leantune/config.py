"""Method configs: one dataclass per method, every field with a help text, plus the shared fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses set ``method`` and add their own options."""

    method: ClassVar[str] = ""

    train_head: bool = option(
        True, "Train (and save) a task head the model creates fresh, such as a new `classifier` or `score`."
    )
    modules_to_save: list[str] = option(
        [], "Names (exact or dotted suffix) of further modules to train fully and save with the delta."
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check option values that need no model; raise ``ValueError`` naming the field and the value."""
        if not isinstance(self.modules_to_save, list):
            raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build the config; an unknown option raises ``TypeError`` naming it and listing the valid ones."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {cls.method!r}; "
                f"valid options: {', '.join(cls.option_names())}"
            )
        return cls(**options)


def check_positive(config: MethodConfig, *names: str) -> None:
    """Raise ``ValueError`` if any named numeric field is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be > 0, got {value!r}")


def check_choice(config: MethodConfig, name: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` if the named field is not one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} must be one of {', '.join(choices)}; got {value!r}")
