"""``leantune inspect``: where a method inserts modules in a model, and the table of what it trains."""

from __future__ import annotations

import argparse
import os


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
    tuned, _, task, _ = build(spec)
    print(f"{spec.model} + {spec.method} ({', '.join(f'{k}={v}' for k, v in tuned.method_config.to_dict().items())})")
    print(tuned.backbone.describe())
    print("\ninsertion points (modules the method added):")
    added = [(name, module) for name, module in tuned.base_model.named_modules() if name not in modules_before]
    tops = [(n, m) for n, m in added if not any(n.startswith(o + ".") for o, _ in added if o != n)]
    for name, module in tops:
        print(f"  base_model.{name}: {type(module).__name__}")
    if tuned.method_modules is not None:
        print(f"  method_modules: {type(tuned.method_modules).__name__} (outside the base model)")
    if not tops and tuned.method_modules is None:
        print("  none (the method trains existing parameters)")
    delta = tuned.delta_state_dict()
    print(f"\ndelta tensors ({len(delta)}; saved by save_pretrained):")
    print(f"  {'name':<78} {'shape':>16} {'numel':>11} trainable")
    for i, (name, tensor) in enumerate(delta.items()):
        if i == 40 and not args.all:
            print(f"  ... {len(delta) - 40} more (--all lists them)")
            break
        trainable = "yes" if getattr(tensor, "requires_grad", False) else "no"
        print(f"  {name:<78} {str(tuple(tensor.shape)):>16} {tensor.numel():>11,d} {trainable}")
    tuned.print_trainable_parameters()
    return 0
