"""Peak training memory of one optimizer step: measured, or estimated in seconds on fake tensors.

What is counted is what ``torch.cuda.max_memory_allocated`` counts: every live tensor (parameters, buffers,
gradients, optimizer state, activations saved for backward, temporaries), not the Python interpreter, the
libraries or allocator slack.

* :func:`measure_peak_training_memory` runs a warm training step (the optimizer state already exists) on the
  model's device. On CUDA it reads the caching allocator's peak; on CPU it follows every tensor storage
  through torch's ``MemTracker`` (a ``TorchDispatchMode``), which is exact and deterministic.
* :func:`estimate_peak_training_memory` builds the model and runs the same steps under ``FakeTensorMode``:
  tensors have shapes, dtypes and devices but no data, so no memory is used and no arithmetic is done.
  The tracker sees the same storages, so the estimate equals the CPU measurement up to a few kilobytes.

Both return a small dict of stats (see :func:`memory_stats`). ``MemTracker`` is a private torch API
(``torch.distributed._tools``, since torch 2.5; leantune is tested with torch 2.13): :func:`tracker_unavailable_reason`
checks at run time that it is there with the parts leantune uses, and both functions raise
:class:`TrackerUnavailableError` saying so when it is not. CUDA measurements do not need it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from leantune.errors import ConfigError, LeantuneError

MIN_TRACKER_TORCH = (2, 5)
# The MemTracker internals leantune's PeakMemoryTracker overrides or calls.
TRACKER_INTERNALS = ("_track_module_params_and_buffers", "_update_and_maybe_create_winfos", "_update_peak_stats",
                     "track_external", "get_tracker_snapshot")

StepFn = Callable[[], Any]
TrainingSetup = tuple[StepFn, nn.Module, torch.optim.Optimizer]

GIB = 1024**3
# MemTracker's reference types (their string values) -> the names used in leantune's stats.
CATEGORY_NAMES = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "other",
}


class TrackerUnavailableError(LeantuneError, RuntimeError):
    """This torch has no usable CPU memory tracker (``torch.distributed._tools.mem_tracker.MemTracker``)."""


def tracker_unavailable_reason() -> str | None:
    """Why the CPU memory tracker (CPU measurement and the estimate) cannot run with this torch, or ``None``."""
    found = torch.__version__
    needs = f"the CPU memory tracker needs torch >= {'.'.join(map(str, MIN_TRACKER_TORCH))} built with " \
            f"torch.distributed (found {found})"
    if _version_tuple(found) < MIN_TRACKER_TORCH:
        return f"{needs}: measure on CUDA instead, or install a newer torch"
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as err:
        return f"{needs}: torch.distributed._tools.mem_tracker cannot be imported ({err})"
    missing = [name for name in TRACKER_INTERNALS if not hasattr(MemTracker, name)]
    if missing or not hasattr(torch.utils, "swap_tensors"):
        lacking = ", ".join(f"MemTracker.{name}" for name in missing) or "torch.utils.swap_tensors"
        return f"{needs}: this torch lacks {lacking} (a private API that changed); measure on CUDA instead"
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; parts that are not numbers end the tuple."""
    numbers = []
    for part in version.split("+")[0].split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def _require_tracker() -> None:
    reason = tracker_unavailable_reason()
    if reason is not None:
        raise TrackerUnavailableError(reason)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> StepFn:
    """One step as a function: forward on ``batch`` (which holds the labels), backward, optimizer step and
    ``zero_grad(set_to_none=True)``; the function returns the loss."""

    def step() -> torch.Tensor:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def memory_stats(peak_bytes: int, breakdown: dict[str, int] | None, device: torch.device, source: str) -> dict:
    """The stats dict: ``peak_bytes``, ``peak_gib``, ``breakdown`` (bytes per category at the peak, or None
    where the source cannot tell), ``device`` and ``source`` (``tracker``, ``estimate`` or ``cuda``)."""
    return {
        "peak_bytes": int(peak_bytes),
        "peak_gib": peak_bytes / GIB,
        "breakdown": breakdown,
        "device": str(device),
        "source": source,
    }


def measure_peak_training_memory(
    step_fn: StepFn, model: nn.Module, optimizer: torch.optim.Optimizer, warmup_steps: int = 1
) -> dict:
    """Peak memory of one training step, run after ``warmup_steps`` untracked steps (so AdamW's state exists).

    ``step_fn`` does the whole step (forward, backward, ``optimizer.step``, ``zero_grad``). The device is the
    one holding the model's parameters: CUDA reads ``torch.cuda.max_memory_allocated``, CPU uses the tracker.
    """
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
    device = _device_of(model)
    if device.type == "cuda":
        for _ in range(warmup_steps):
            step_fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        torch.cuda.synchronize(device)
        return memory_stats(torch.cuda.max_memory_allocated(device), None, device, "cuda")
    if device.type != "cpu":
        raise ConfigError(f"peak memory can be measured on cpu or cuda, not on {device.type}")
    _require_tracker()
    return _tracked_peak(step_fn, model, optimizer, warmup_steps, source="tracker")


def estimate_peak_training_memory(setup: Callable[[], TrainingSetup], warmup_steps: int = 1) -> dict:
    """Estimate :func:`measure_peak_training_memory` without allocating: ``setup()`` builds the model, the
    optimizer and the inputs and returns ``(step_fn, model, optimizer)``; it runs under ``FakeTensorMode``,
    so every tensor it creates (on CPU) is fake. Takes seconds even for batch 100 on T5-base."""
    _require_tracker()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), _fake_parameter_conversion():
        step_fn, model, optimizer = setup()
        return _tracked_peak(step_fn, model, optimizer, warmup_steps, source="estimate")


@contextmanager
def _fake_parameter_conversion() -> Iterator[None]:
    """Let ``module.to(dtype or device)`` convert fake parameters.

    ``nn.Module._apply`` replaces a fake parameter through ``torch.utils.swap_tensors``, which refuses any tensor
    with a weak reference, and every fake ``Parameter`` has one (torch 2.13), so ``.to()`` fails under
    ``FakeTensorMode``. Inside this context a swap of two fake tensors assigns ``.data`` instead, which is what
    ``_apply`` does for ordinary tensors: the parameter object stays and takes the converted tensor.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    swap_tensors = torch.utils.swap_tensors

    def swap_or_assign_data(t1: torch.Tensor, t2: torch.Tensor) -> None:
        if isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor):
            t1.data = t2.detach()
        else:
            swap_tensors(t1, t2)

    torch.utils.swap_tensors = swap_or_assign_data
    try:
        yield
    finally:
        torch.utils.swap_tensors = swap_tensors


def _tracked_peak(
    step_fn: StepFn, model: nn.Module, optimizer: torch.optim.Optimizer, warmup_steps: int, source: str
) -> dict:
    for _ in range(warmup_steps):
        step_fn()
    tracker = _make_tracker()
    tracker.track_external(model, optimizer)
    with warnings.catch_warnings():
        # ModTracker warns for modules garbage-collected before their backward hooks fire; harmless here.
        warnings.filterwarnings("ignore", message="Module is None")
        with tracker:
            step_fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    device = _device_of(model)
    per_device = next((snap for dev, snap in snapshot.items() if torch.device(dev).type == device.type), None)
    if per_device is None:
        raise ConfigError(f"the memory tracker saw no tensor on {device}; does step_fn run the model?")
    breakdown = {CATEGORY_NAMES[str(getattr(k, "value", k))]: v for k, v in per_device.items() if k != "Total"}
    return memory_stats(per_device["Total"], breakdown, device, source)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise ConfigError(f"{type(model).__name__} has no parameters to place it on a device")
    return param.device


def _make_tracker() -> Any:
    """torch's MemTracker, adapted: grad hooks only on parameters that train, and only the global peak kept.

    Callers check :func:`tracker_unavailable_reason` first."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class PeakMemoryTracker(MemTracker):
        """Stock MemTracker hooks every parameter for its gradient, which fails on a frozen one ("cannot register
        a hook on a tensor that doesn't require gradient", torch 2.13); it also snapshots every active module at
        every op, which costs minutes on T5-base. This one hooks trainable parameters only and keeps the global
        peak, which is all leantune reports."""

        def _track_module_params_and_buffers(
            self, module: nn.Module, install_grad_hooks: bool = True
        ) -> tuple[int, int]:
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(self._track_gradient),
                            param.register_post_accumulate_grad_hook(lambda p: self._track_gradient(p.grad)),
                        )
            return memory

        def _track_gradient(self, grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snap in self._curr_mem_snap.items():
                if snap[_TOTAL_KEY] > self._peak_mem.get(device, 0):
                    self._peak_mem[device] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snap)

    return PeakMemoryTracker()
