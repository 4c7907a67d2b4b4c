"""Fisher information of model parameters from task data: the one estimator behind LST's init and FISH masks.

``fisher_scores`` sums per-example gradient statistics (squared, or absolute) over ``num_samples`` examples, in
eval mode (no dropout), accumulated in float32:

``empirical``  the gradient of the model's loss on the example's own label (text-to-text: the target's loss);
``expected``   ``sum_c p_c * stat(grad of -log p_c)`` over the classes of a classification head, the exact
               expectation under the model's predicted distribution.

Every example is run as if alone (batch size 1): its trailing padding is cut off (exact: padded positions are
masked out), so only its real tokens cost time. Two ways to get each example's own gradient, giving the same
scores up to float rounding:

vectorised  examples of equal shape and equal attention mask run together, ``batch_size`` at a time, under
            ``torch.func`` (``vmap`` of ``grad`` over ``functional_call``): one vectorised forward and backward.
            The default on a GPU. Where ``vmap`` cannot run the model (data-dependent control flow, operators
            without batching rules) the loop takes over.
loop        one forward and backward per example; an embedding table's gradient is assembled from its
            looked-up rows only, not the whole table. The default on a CPU, where it is the faster one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from leantune.errors import ConfigError, LeantuneError, UnsupportedMethodError
from leantune.progress import bars_shown

logger = logging.getLogger("leantune.fisher")

FISHER_KINDS = ("empirical", "expected")
STATISTICS = ("square", "absolute")
# Inputs laid out like the attention mask (batch, tokens): cut with it when an example's padding is removed.
TOKEN_ALIGNED_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
IGNORED_LABEL = -100
# Per-example gradients a vectorised chunk may hold at once (float32 bytes); caps the automatic batch size.
GRADIENT_MEMORY_BUDGET = 1 << 30
# Examples per vectorised pass when the caller sets none. On a CPU the per-example loop is the faster one (all-MiniLM-
# L6-v2, 64 tweets: 3.3 s of CPU time for the loop, 9.0 s vectorised 4 at a time), so it is the default there.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 32}
PROGRESS_DELAY_S = 2.0

Example = dict[str, Any]


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


def example_count(data: Any) -> int | None:
    """How many examples ``data`` holds, where it tells without being read: its ``num_examples``, or the sum of
    the batch sizes of a list or tuple of batches; ``None`` for anything else (a generator, a loader)."""
    count = getattr(data, "num_examples", None)
    if isinstance(count, int):
        return count
    if not isinstance(data, (list, tuple)):
        return None
    sizes = [next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 0)
             for batch in data if isinstance(batch, dict)]
    return sum(sizes) if len(sizes) == len(data) else None


def strip_padding(example: Example, labels_aligned: bool = True) -> Example:
    """The batch-1 ``example`` without its trailing padding (attention mask ``1..1 0..0``).

    The token-aligned inputs are cut to the real length; so are the labels when they are laid out per input
    token (``labels_aligned``, not for encoder-decoder targets) and hold only ``-100`` on the padding. Anything
    else (left padding, masks with holes, labels on padding) leaves the example as it is.
    """
    mask = example.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != 1:
        return example
    length = int(mask.sum())
    if length in (0, mask.shape[1]) or not bool(mask[0, :length].all()):
        return example
    aligned = [k for k in TOKEN_ALIGNED_INPUTS if isinstance(example.get(k), torch.Tensor)
               and example[k].shape[:2] == mask.shape]
    labels = example.get("labels")
    if labels_aligned and isinstance(labels, torch.Tensor) and labels.shape[:2] == mask.shape:
        if bool((labels[0, length:] != IGNORED_LABEL).any()):
            return example
        aligned.append("labels")
    return {k: v[:, :length] if k in aligned else v for k, v in example.items()}


def fisher_scores(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[dict[str, Any]],
    num_samples: int,
    fisher: str = "empirical",
    grad_type: str = "square",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Per-entry Fisher scores of ``params`` (float32, same shapes) from ``num_samples`` examples of ``batches``.

    ``batch_size``: examples whose gradients are computed together (1: one backward pass per example; default:
    :data:`DEFAULT_BATCH_SIZE` for the device, capped so that their per-example gradients fit in
    :data:`GRADIENT_MEMORY_BUDGET`). ``progress``: a progress bar on stderr, shown after
    :data:`PROGRESS_DELAY_S` and removed when done; ``None`` = shown except inside
    :func:`leantune.progress.hidden` (the CLI's ``--no-progress``) or with tqdm's own ``TQDM_DISABLE=1``;
    ``False`` = never.
    Requires-grad flags and the train/eval mode are restored afterwards, and no ``.grad`` is left behind.
    """
    if fisher not in FISHER_KINDS or grad_type not in STATISTICS:
        raise ConfigError(f"fisher must be one of {FISHER_KINDS} and grad_type one of {STATISTICS}; "
                          f"got {fisher!r}, {grad_type!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"Fisher batch_size must be >= 1, got {batch_size}")
    accumulator = _Accumulator(model, params, fisher, torch.square if grad_type == "square" else torch.abs)
    chunk = accumulator.batch_size(batch_size)
    labels_aligned = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    groups: dict[tuple, list[Example]] = {}
    if progress is None and not bars_shown():
        progress = False
    shown = {} if progress is None else {"disable": not progress}
    bar = tqdm(total=num_samples, desc="Fisher scores", unit="example", leave=False, delay=PROGRESS_DELAY_S,
               **shown)
    with _fisher_mode(model, accumulator.tensors), bar:
        for example in single_examples(batches, num_samples):
            example = strip_padding(_to_device(example, accumulator.device), labels_aligned)
            if chunk == 1 or not accumulator.vectorised:
                accumulator.add_one(example)
                bar.update(1)
                continue
            key = _group_key(example)
            groups.setdefault(key, []).append(example)
            if len(groups[key]) == chunk:
                accumulator.add_group(groups.pop(key))
                bar.update(chunk)
        for group in groups.values():
            accumulator.add_group(group)
            bar.update(len(group))
    if accumulator.seen == 0:
        raise ConfigError("Fisher data: the batches hold no examples to compute Fisher scores from")
    logger.info("Fisher scores from %d examples (%s, %s, %s)", accumulator.seen, fisher, grad_type,
                f"vectorised, {chunk} at a time" if chunk > 1 and accumulator.vectorised else "one per backward")
    return accumulator.scores()


class _Accumulator:
    """The running sums, and the two ways of adding examples to them: vectorised groups, or one at a time."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], fisher: str,
                 statistic: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model, self.fisher, self.statistic = model, fisher, statistic
        self.names = list(params)
        self.tensors = [params[n] for n in self.names]
        if not self.tensors:
            raise ConfigError("Fisher scores: no parameters given to score")
        self.device = self.tensors[0].device
        self.sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.tensors]
        # Tied parameters appear once to torch.func (it refuses two names of one tensor); aliases share a sum.
        self.first_index: dict[int, int] = {}
        for index, tensor in enumerate(self.tensors):
            self.first_index.setdefault(id(tensor), index)
        self.unique = sorted(set(self.first_index.values()))
        self.lookup_tables = _lookup_tables(model, {id(self.tensors[i]) for i in self.unique})
        self.vectorised = True
        self.seen = 0

    def batch_size(self, requested: int | None) -> int:
        """``requested``, or the device's default capped by the memory of the per-example gradients."""
        if requested is not None:
            return requested
        per_example = 4 * sum(self.tensors[i].numel() for i in self.unique)
        default = DEFAULT_BATCH_SIZE.get(self.device.type, DEFAULT_BATCH_SIZE["cpu"])
        return max(1, min(default, GRADIENT_MEMORY_BUDGET // max(1, per_example)))

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: self.sums[self.first_index[id(t)]] for name, t in zip(self.names, self.tensors)}

    def add_one(self, example: Example) -> None:
        """One forward and one backward per loss term of the example (the per-example loop).

        An embedding table's gradient is built from the gradients of its looked-up rows (the lookups' outputs
        are made leaves), so only the rows the example uses are touched instead of the whole table.
        """
        with _lookups_as_leaves(self.lookup_tables) as lookups:
            outputs = self.model(**example)
        targets = [self.tensors[i] for i in self.unique]
        for weight, loss in _losses(outputs, self.fisher):
            grads = torch.autograd.grad(loss, targets + [leaf for _, _, leaf in lookups], retain_graph=True,
                                        allow_unused=True)
            looked_up = {}
            for (table, ids, _), grad in zip(lookups, grads[len(targets):]):
                looked_up.setdefault(id(table.weight), []).append((table, ids, grad))
            for index, grad in zip(self.unique, grads[:len(targets)]):
                rows = looked_up.get(id(self.tensors[index]))
                if rows is not None:
                    self._add_rows(index, grad, rows, weight)
                elif grad is not None:
                    self._add(index, grad.detach().float(), weight)
        self.seen += 1

    def _add(self, index: int, grad: torch.Tensor, weight: float) -> None:
        """``sums[index] += weight * statistic(grad)``, without a temporary for the square."""
        if self.statistic is torch.square:
            self.sums[index].addcmul_(grad, grad, value=weight)
        else:
            self.sums[index].add_(self.statistic(grad), alpha=weight)

    def _add_rows(self, index: int, dense: torch.Tensor | None, lookups: list, weight: float) -> None:
        """Add one example's statistic of an embedding table: its looked-up rows' gradients summed per row,
        plus ``dense``, the gradient of the table's other uses (a tied output layer), if any."""
        ids, grads = _row_gradients(lookups)
        if dense is not None:
            self._add(index, dense.detach().float().index_add(0, ids, grads), weight)
            return
        rows, position = ids.unique(return_inverse=True)
        per_row = torch.zeros(len(rows), grads.shape[-1], dtype=torch.float32, device=grads.device)
        self.sums[index].index_add_(0, rows, self.statistic(per_row.index_add_(0, position, grads)), alpha=weight)

    def add_group(self, group: list[Example]) -> None:
        """Examples of equal shapes and masks in one vectorised pass; the loop if ``vmap`` cannot run the model."""
        if self.vectorised:
            try:
                self._add_vectorised(group)
                self.seen += len(group)
                return
            except LeantuneError:
                raise
            except Exception as err:  # vmap cannot run this model: use the loop from now on
                self.vectorised = False
                logger.info("Fisher scores: %s cannot run under torch.func.vmap (%s); one backward per example",
                            type(self.model).__name__, str(err).strip().splitlines()[0] if str(err) else err)
        for example in group:
            self.add_one(example)

    def _add_vectorised(self, group: list[Example]) -> None:
        first = group[0]
        batched = {k: torch.stack([e[k] for e in group]) for k, v in first.items()
                   if isinstance(v, torch.Tensor) and not _is_mask(k)}
        shared = {k: v for k, v in first.items() if k not in batched}  # masks (equal in a group), task names
        params = {self.names[i]: self.tensors[i].detach() for i in self.unique}
        grads, weights = _per_example_gradients(self.model, params, batched, shared, self.fisher)
        for index in self.unique:
            stats = self.statistic(grads[self.names[index]].float())  # (examples[, classes], *shape)
            flat = stats.reshape(weights.numel(), -1)
            self.sums[index].add_((weights.reshape(1, -1).float() @ flat).view(self.sums[index].shape))


def _lookup_tables(model: nn.Module, target_ids: set[int]) -> list[nn.Embedding]:
    """The model's plain embedding tables whose weight is scored: ``nn.Embedding`` with its own ``forward`` (a
    subclass may look up other rows than its input names), no max_norm renormalisation and no gradient scaling
    by frequency. Their gradient is the sum of the looked-up rows' gradients."""
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward
            and id(m.weight) in target_ids and m.max_norm is None and not m.scale_grad_by_freq]


@contextmanager
def _lookups_as_leaves(tables: list[nn.Embedding]) -> Iterator[list[tuple[nn.Embedding, torch.Tensor, torch.Tensor]]]:
    """While active, every lookup of ``tables`` returns a leaf tensor; yields ``(table, ids, leaf)`` per lookup."""
    lookups: list[tuple[nn.Embedding, torch.Tensor, torch.Tensor]] = []

    def as_leaf(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        lookups.append((module, args[0] if args else kwargs["input"], leaf))
        return leaf

    handles = [table.register_forward_hook(as_leaf, with_kwargs=True) for table in tables]
    try:
        yield lookups
    finally:
        for handle in handles:
            handle.remove()


def _row_gradients(lookups: list[tuple[nn.Embedding, torch.Tensor, torch.Tensor | None]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, gradients)`` of every looked-up row (float32), leaving out the padding row (whose gradient
    ``nn.Embedding`` keeps at zero) and lookups the loss does not reach."""
    ids, grads = [], []
    for table, table_ids, grad in lookups:
        if grad is None:
            continue
        flat_ids, flat_grads = table_ids.reshape(-1), grad.detach().float().reshape(-1, grad.shape[-1])
        if table.padding_idx is not None:
            keep = flat_ids != table.padding_idx
            flat_ids, flat_grads = flat_ids[keep], flat_grads[keep]
        ids.append(flat_ids)
        grads.append(flat_grads)
    if not ids:
        table = lookups[0][0]
        return (torch.zeros(0, dtype=torch.long, device=table.weight.device),
                torch.zeros(0, table.embedding_dim, device=table.weight.device))
    return torch.cat(ids), torch.cat(grads)


def _per_example_gradients(model: nn.Module, params: dict[str, torch.Tensor], batched: dict[str, torch.Tensor],
                           shared: dict[str, Any], fisher: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(gradients, weights)``: each example's gradients (``(examples, *shape)``; expected Fisher:
    ``(examples, classes, *shape)`` of ``log p_c``) and the weight of each (ones; expected: ``p_c``)."""
    from torch.func import functional_call, grad, jacrev, vmap

    def run(values: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> Any:
        return functional_call(model, values, args=(), kwargs={**inputs, **shared})

    if fisher == "empirical":
        def loss(values: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return _losses(run(values, inputs), fisher)[0][1]

        grads = vmap(grad(loss), in_dims=(None, 0))(params, batched)
        return grads, torch.ones(next(iter(batched.values())).shape[0], device=next(iter(params.values())).device)

    def log_probs(values: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        result = torch.log_softmax(_classification_logits(run(values, inputs)).float(), dim=-1)[0]
        return result, result.detach().exp()

    grads, probs = vmap(jacrev(log_probs, has_aux=True), in_dims=(None, 0))(params, batched)
    return grads, probs


def _losses(outputs: Any, fisher: str) -> list[tuple[float, torch.Tensor]]:
    """``(weight, loss)`` pairs whose weighted gradient statistics make one example's score."""
    if fisher == "empirical":
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ConfigError("Fisher data: the model returned no loss; data batches must include labels")
        return [(1.0, loss)]
    log_probs = torch.log_softmax(_classification_logits(outputs).float(), dim=-1)[0]
    probs = log_probs.detach().exp()
    return [(float(probs[c]), -log_probs[c]) for c in range(log_probs.shape[0])]


def _classification_logits(outputs: Any) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.dim() != 2 or logits.shape[-1] < 2:
        shape = None if logits is None else tuple(logits.shape)
        raise UnsupportedMethodError(
            f"the expected Fisher needs a classification head (logits of shape (batch, classes>=2)), "
            f"got logits of shape {shape}; use the empirical Fisher"
        )
    return logits


def _is_mask(name: str) -> bool:
    """Attention masks are shared by a group (equal within it): models branch on their values."""
    return name.endswith("attention_mask")


def _group_key(example: Example) -> tuple:
    """Examples with equal keys run in one vectorised pass: equal tensor shapes and dtypes, equal masks and
    equal non-tensor values."""
    key = []
    for name in sorted(example):
        value = example[name]
        if isinstance(value, torch.Tensor):
            content = tuple(value.flatten().tolist()) if _is_mask(name) else None
            key.append((name, tuple(value.shape), str(value.dtype), content))
        else:
            key.append((name, repr(value)))
    return tuple(key)


def _to_device(example: Example, device: torch.device) -> Example:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}


@contextmanager
def _fisher_mode(model: nn.Module, tensors: list[nn.Parameter]) -> Iterator[None]:
    """Eval mode and gradients on for ``tensors``; the flags and the mode restored afterwards."""
    flags = [p.requires_grad for p in tensors]
    was_training = model.training
    model.eval()
    try:
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.train(was_training)
