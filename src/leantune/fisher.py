"""Fisher information of model parameters from task data: the one estimator behind LST's init and FISH masks.

``fisher_scores`` sums per-example gradient statistics (squared, or absolute) over ``num_samples`` examples at
batch size 1, in eval mode (no dropout), accumulated in float32:

``empirical``  the gradient of the model's loss on the example's own label (text-to-text: the target's loss);
``expected``   ``sum_c p_c * stat(grad of -log p_c)`` over the classes of a classification head (one backward
               per class), the exact expectation under the model's predicted distribution.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from leantune.errors import ConfigError, UnsupportedMethodError

logger = logging.getLogger("leantune.fisher")

FISHER_KINDS = ("empirical", "expected")
STATISTICS = ("square", "absolute")


def single_examples(batches: Iterable[dict[str, Any]], limit: int) -> Iterator[dict[str, Any]]:
    """Split batches into batch-1 examples (every batched tensor sliced on its first dimension); stop after
    ``limit``. Non-tensor values (a task name) are passed on unchanged."""
    count = 0
    for batch in batches:
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not tensors:
            raise ConfigError("Fisher data: a batch holds no tensors; batches must be dicts of inputs and labels")
        size = tensors[0].shape[0]
        for i in range(size):
            if count == limit:
                return
            yield {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
                   for k, v in batch.items()}
            count += 1


def fisher_scores(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[dict[str, Any]],
    num_samples: int,
    fisher: str = "empirical",
    grad_type: str = "square",
) -> dict[str, torch.Tensor]:
    """Per-entry Fisher scores of ``params`` (float32, same shapes) from ``num_samples`` examples of ``batches``.

    Requires-grad flags and the train/eval mode are restored afterwards, and no ``.grad`` is left behind.
    """
    if fisher not in FISHER_KINDS or grad_type not in STATISTICS:
        raise ConfigError(f"fisher must be one of {FISHER_KINDS} and grad_type one of {STATISTICS}; "
                          f"got {fisher!r}, {grad_type!r}")
    names = list(params)
    tensors = [params[n] for n in names]
    scores = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
    statistic = torch.square if grad_type == "square" else torch.abs
    flags = [p.requires_grad for p in tensors]
    was_training = model.training
    device = tensors[0].device
    seen = 0
    model.eval()
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for example in single_examples(batches, num_samples):
                example = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
                outputs = model(**example)
                for weight, loss in _losses(outputs, fisher):
                    grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
                    for score, grad in zip(scores, grads):
                        if grad is not None:
                            score.add_(statistic(grad.detach().float()), alpha=weight)
                seen += 1
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise ConfigError("Fisher data: the batches hold no examples to compute Fisher scores from")
    logger.info("Fisher scores from %d examples (%s, %s)", seen, fisher, grad_type)
    return dict(zip(names, scores))


def _losses(outputs: Any, fisher: str) -> list[tuple[float, torch.Tensor]]:
    """``(weight, loss)`` pairs whose weighted gradient statistics make one example's score."""
    if fisher == "empirical":
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ConfigError("Fisher data: the model returned no loss; data batches must include labels")
        return [(1.0, loss)]
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.dim() != 2 or logits.shape[-1] < 2:
        shape = None if logits is None else tuple(logits.shape)
        raise UnsupportedMethodError(
            f"the expected Fisher needs a classification head (logits of shape (batch, classes>=2)), "
            f"got logits of shape {shape}; use the empirical Fisher"
        )
    log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
    probs = log_probs.detach().exp()
    return [(float(probs[c]), -log_probs[c]) for c in range(log_probs.shape[0])]
