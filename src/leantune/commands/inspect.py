"""``leantune inspect``: where a method inserts modules in a model, which of them are per task and which shared,
and the table of what it trains. A vision model (ViT, DINOv2, Swin, CLIP, ...) without ``--task`` is shown as an
image classifier with a two-class head, random images standing in for the data that data-initialised methods
(LST's Fisher init, FISH's mask) read."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from leantune.api import TunedModel
    from leantune.methods.base import TuningMethod
    from leantune.tasks.multitask import MultiTask


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="Show where a method attaches to a model and what it trains.",
                                   description=__doc__)
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="Model id or local folder.")
    parser.add_argument("--method", default="lst", help="Tuning method.")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="A method option, e.g. --set r=16.")
    parser.add_argument("--task", action="append", help="Task whose head (and data, for data-initialised "
                        "methods) is used (default: tweets; for a vision model: random images of two classes); "
                        "repeat it for several tasks (a task-aware method then gets their names as its tasks).")
    parser.add_argument("--glue-dir", help="Folder with GLUE's TSV files.")
    parser.add_argument("--all", action="store_true", help="List every delta tensor (default: the first 40).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import leantune
    from leantune.commands.train import parse_assignments
    from leantune.tasks.images import stand_in_images
    from leantune.tasks.multitask import MultiTask
    from leantune.train.run import RunSpec, build, is_vision_model, options_with_tasks

    names = args.task or ["tweets"]
    spec = RunSpec(model=args.model, method=args.method, options=parse_assignments(args.set, "--set"),
                   task=names[0], glue_dir=args.glue_dir, train={"train_examples": 256},
                   tasks=[{"task": name} for name in names] if len(names) > 1 else None)
    images = MultiTask([stand_in_images()]) if args.task is None and is_vision_model(args.model) else None
    # unknown method or option: fail before loading anything
    leantune.make_config(spec.method, **options_with_tasks(spec, images.names if images else spec.task_names()))
    base, _, _, _ = build(spec, for_loading=True, tasks=images)
    modules_before = {name for name, _ in base.named_modules()}
    tuned, _, tasks, _ = build(spec, tasks=images)
    print(f"{spec.model} + {spec.method} ({', '.join(f'{k}={v}' for k, v in tuned.method_config.to_dict().items())})")
    if images is not None:
        print("(a vision model: shown as an image classifier with a 2-class head; random images stand in for data)")
    print(tuned.backbone.describe())
    print("\nmethod facts:")
    for line in method_facts(tuned.method):
        print(f"  {line}")
    print("\ninsertion points (modules the method added):")
    for line in insertion_points(tuned, modules_before):
        print(f"  {line}")
    if len(tasks) > 1:
        print("\ntasks (each batch holds one):")
        for line in task_outputs(tuned, tasks):
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
    from leantune.methods.base import BRANCHES, get_branches

    added = [(name, module) for name, module in tuned.base_model.named_modules() if name not in modules_before]
    tops = [(n, m) for n, m in added if not any(n.startswith(o + ".") for o, _ in added if o != n)]
    lines = []
    for name, module in tops:
        owner_name, _, attribute = name.rpartition(".")
        branches = get_branches(tuned.base_model.get_submodule(owner_name)) if attribute == BRANCHES else {}
        if branches:
            lines += [f"base_model.{name}.{branch}: {describe_module(b)}" for branch, b in branches.items()]
        else:
            lines.append(f"base_model.{name}: {describe_module(module)}")
    if tuned.method_modules is not None:
        lines.append(f"method_modules: {describe_module(tuned.method_modules)} (outside the base model)")
    return lines or ["none (the method trains existing parameters)"]


def task_outputs(tuned: TunedModel, tasks: MultiTask) -> list[str]:
    """Where each task's predictions come from: its label words (text-to-text) or its slice of the joint head."""
    from leantune.train.data import is_text_to_text

    if is_text_to_text(tuned):
        return [f"{task.name}: text-to-text, generates {', '.join(task.label_names or ['a number'])}"
                for task in tasks]
    return [f"{name}: outputs {start}..{stop - 1} of the joint head ({stop - start} of {tasks.num_labels})"
            for name, (start, stop) in tasks.head_slices().items()]


def describe_module(module: nn.Module) -> str:
    """The module's class and, for a task-aware module, which of its parts are per task and which shared."""
    layout = task_layout(module)
    return type(module).__name__ + (f": {layout}" if layout else "")


def task_layout(module: nn.Module) -> str | None:
    """How a module splits its weights between tasks (None when it does not): one branch per task with the
    modules every branch holds as the same object shared (``PerTask``), per-task rows of an embedding table
    beside shared modules (Hyperformer's task embeddings and hypernetworks), or weights generated per task."""
    from torch import nn

    shared_source = module.__dict__.get("shared")
    if isinstance(getattr(shared_source, "tasks", None), list):
        return f"weights generated for the call's task ({', '.join(shared_source.tasks)}) by method_modules"
    tasks = getattr(module, "tasks", None)
    if not isinstance(tasks, list):
        return None
    listed = ", ".join(tasks)
    per_task = getattr(module, "per_task", None)
    if isinstance(per_task, nn.ModuleDict):
        one = next(iter(per_task.values()))
        shared = module.shared_modules() if hasattr(module, "shared_modules") else set()
        own = [name for name, child in one.named_children()
               if name not in shared and any(True for _ in child.parameters())]
        if not shared:
            return f"one {type(one).__name__} per task ({listed})"
        return (f"one {type(one).__name__} per task ({listed}); each task's own: {', '.join(own)}; shared by every "
                f"task: {', '.join(sorted(n for n in shared if '.' not in n))}")
    rows = [name for name, child in module.named_children()
            if isinstance(child, nn.Embedding) and child.num_embeddings == len(tasks)]
    if not rows:
        return None
    shared = [f"{name} ({', '.join(child)})" if isinstance(child, nn.ModuleDict) else name
              for name, child in module.named_children() if name not in rows]
    return f"one row of {', '.join(rows)} per task ({listed}); shared by every task: {', '.join(shared)}"


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
