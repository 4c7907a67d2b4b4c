"""``leantune inspect``: where a method inserts modules in a model, and the table of what it trains."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from leantune.methods.base import BRANCHES, get_branches

if TYPE_CHECKING:
    import torch

    from leantune.api import TunedModel
    from leantune.methods.base import TuningMethod


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="Show where a method attaches to a model and what it trains.",
                                   description=__doc__)
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="Model id or local folder.")
    parser.add_argument("--method", default="lst", help="Tuning method.")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="A method option, e.g. --set r=16.")
    parser.add_argument("--task", default="tweets", help="Task whose head (and data, for data-initialised "
                        "methods) is used (default: tweets).")
    parser.add_argument("--glue-dir", help="Folder with GLUE's TSV files.")
    parser.add_argument("--all", action="store_true", help="List every delta tensor (default: the first 40).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import leantune
    from leantune.commands.train import parse_assignments
    from leantune.train.run import RunSpec, build

    spec = RunSpec(model=args.model, method=args.method, options=parse_assignments(args.set, "--set"),
                   task=args.task, glue_dir=args.glue_dir, train={"train_examples": 256})
    leantune.make_config(spec.method, **spec.options)  # unknown method or option: fail before loading anything
    base, _, _, _ = build(spec, for_loading=True)
    modules_before = {name for name, _ in base.named_modules()}
    tuned, _, _, _ = build(spec)
    print(f"{spec.model} + {spec.method} ({', '.join(f'{k}={v}' for k, v in tuned.method_config.to_dict().items())})")
    print(tuned.backbone.describe())
    print("\nmethod facts:")
    for line in method_facts(tuned.method):
        print(f"  {line}")
    print("\ninsertion points (modules the method added):")
    for line in insertion_points(tuned, modules_before):
        print(f"  {line}")
    print_delta_table(tuned.delta_state_dict(), show_all=args.all)
    tuned.print_trainable_parameters()
    return 0


def method_facts(method: TuningMethod) -> list[str]:
    """What the rest of leantune reads from the method class (see ``leantune.methods.base``)."""
    inputs = method.declared_inputs()
    return [
        f"mergeable: {'yes' if method.mergeable else 'no (' + method.merge_unsupported_reason + ')'}",
        "per-call inputs: " + ("; ".join(f"{i.name} ({'required' if i.required else 'optional'}: {i.help})"
                                         for i in inputs) if inputs else "none"),
        f"needs data at wrap: {'yes' if method.needs_data() else 'no'}",
        f"default learning rate: {method.default_learning_rate:g}",
        f"options for short CPU budgets: {method.budget_options or 'none'}",
    ]


def insertion_points(tuned: TunedModel, modules_before: set[str]) -> list[str]:
    """One line per module the method added to the base model, each named branch by its name, and one for
    modules the tuned model owns outside it."""
    added = [(name, module) for name, module in tuned.base_model.named_modules() if name not in modules_before]
    tops = [(n, m) for n, m in added if not any(n.startswith(o + ".") for o, _ in added if o != n)]
    lines = []
    for name, module in tops:
        owner_name, _, attribute = name.rpartition(".")
        branches = get_branches(tuned.base_model.get_submodule(owner_name)) if attribute == BRANCHES else {}
        if branches:
            lines += [f"base_model.{name}.{branch}: {type(b).__name__}" for branch, b in branches.items()]
        else:
            lines.append(f"base_model.{name}: {type(module).__name__}")
    if tuned.method_modules is not None:
        lines.append(f"method_modules: {type(tuned.method_modules).__name__} (outside the base model)")
    return lines or ["none (the method trains existing parameters)"]


def print_delta_table(delta: dict[str, torch.Tensor], show_all: bool, limit: int = 40) -> None:
    """The tensors ``save_pretrained`` writes: name, shape, size and whether they train."""
    print(f"\ndelta tensors ({len(delta)}; saved by save_pretrained):")
    print(f"  {'name':<78} {'shape':>16} {'numel':>11} trainable")
    for i, (name, tensor) in enumerate(delta.items()):
        if i == limit and not show_all:
            print(f"  ... {len(delta) - limit} more (--all lists them)")
            break
        trainable = "yes" if getattr(tensor, "requires_grad", False) else "no"
        print(f"  {name:<78} {str(tuple(tensor.shape)):>16} {tensor.numel():>11,d} {trainable}")
