"""``wrap`` a Hugging Face model with a method config, save only the delta, ``load`` it back."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from leantune import __version__
from leantune.backbones import ArchitectureMap, Backbone, resolve
from leantune.config import MethodConfig
from leantune.context import call_inputs, task_name
from leantune.errors import CheckpointError, ConfigError, UnsupportedMethodError
from leantune.files import sha256_file, write_atomic
from leantune.methods.base import AttachContext, TuningMethod, resolve_module_names
from leantune.registry import get_method, methods

CONFIG_NAME = "leantune_config.json"
DELTA_NAME = "delta.safetensors"

# Config keys that differ between a model built in code and the same model loaded from disk.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "dtype", "torch_dtype", "name_or_path"}
MAX_DIFFERENCES_SHOWN = 6  # differing config entries named in load's error


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a base model: its class and type, a hash of its config, a hash of its parameter names and
    shapes, and the config's entries (``config_values``: single values as they are, others as a short hash) so
    that ``load`` can say what differs."""
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if config is not None else {}
    config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    shapes = [[name, list(p.shape)] for name, p in model.named_parameters()]
    values: dict[str, Any] = {"num_labels": getattr(config, "num_labels", None)} if config is not None else {}
    for key, value in sorted(config_dict.items()):
        if key == "model_type":  # a field of its own
            continue
        values[key] = value if _is_single_value(value) else f"sha256:{_sha256_json(value)[:12]}"
    return {
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "config_sha256": _sha256_json(config_dict),
        "parameters_sha256": _sha256_json(shapes),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config_values": values,
    }


def _is_single_value(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class TunedModel(nn.Module):
    """A Hugging Face model with one tuning method attached; forwards and generates like the model it wraps."""

    def __init__(
        self,
        base_model: nn.Module,
        method: TuningMethod,
        backbone: Backbone,
        base_fingerprint: dict[str, Any],
        method_modules: nn.Module | None,
        added_names: set[str],
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.method_modules = method_modules
        self.method = method
        self.backbone = backbone
        self.base_fingerprint = base_fingerprint
        self._added_names = added_names
        self._merged = False

    @property
    def method_config(self) -> MethodConfig:
        """The method's config."""
        return self.method.config

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks (``config``, ``device``, ...) come from the base model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_not_merged()
        with call_inputs(self._take_call_inputs(kwargs)):
            return self.method.forward(self, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_not_merged()
        with call_inputs(self._take_call_inputs(kwargs)):
            return self.method.generate(self, *args, **kwargs)

    def _take_call_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Remove the method's per-call inputs from ``kwargs``; a required one that is missing is an error."""
        values = {}
        for declared in self.method.declared_inputs():
            if declared.name in kwargs:
                values[declared.name] = kwargs.pop(declared.name)
                if declared.choices is not None:
                    task_name(values[declared.name], declared.choices)  # refuses an unknown task, naming it
            elif declared.required:
                raise ConfigError(f"method {self.method.name!r} needs {declared.name!r} in every forward and "
                                  f"generate call ({declared.help})")
        return values

    def _check_not_merged(self) -> None:
        if self._merged:
            raise UnsupportedMethodError("this TunedModel was merged; use the model merge() returned")

    # --- parameters -------------------------------------------------------------------------------
    def trainable_parameter_count(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, tied weights counted once."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def new_module_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of modules that start from scratch around the backbone: its task heads (when
        the method trains them) and the modules the model declares in ``leantune_trainable_modules`` (a
        vision-language model's projection and answer head). ``TrainConfig.new_module_learning_rate`` applies to
        these."""
        modules = [m for _, m in self.backbone.task_heads()] if self.method_config.train_head else []
        modules += [self.base_model.get_submodule(n) for n in always_trained_modules(self.base_model)]
        seen: set[int] = set()
        found = []
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    found.append(p)
        return found

    def print_trainable_parameters(self) -> None:
        """Print peft's line: ``trainable params: N || all params: M || trainable%: P``."""
        trainable, total = self.trainable_parameter_count()
        percent = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """What the method trained or added: trainable parameters plus every parameter and buffer it added."""
        delta = {n: p for n, p in self.named_parameters() if p.requires_grad or n in self._added_names}
        delta.update({n: b for n, b in self.named_buffers() if n in self._added_names})
        return delta

    # --- save / load / merge ----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``leantune_config.json`` and ``delta.safetensors`` (only the delta), each atomically.

        ``state_dict`` replaces the delta's values (as peft's argument does): e.g. an FSDP model's delta gathered
        from its shards; it must hold exactly the delta's names.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        delta = self.delta_state_dict()
        if state_dict is not None:
            if set(state_dict) != set(delta):
                raise CheckpointError(f"save_pretrained: state_dict must hold exactly the delta's {len(delta)} "
                                      f"tensors, got {len(state_dict)}")
            delta = state_dict
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in delta.items()}
        delta_path = directory / DELTA_NAME
        write_atomic(delta_path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        record = {
            "method": self.method.name,
            "options": self.method.config.to_dict(),
            "leantune_version": __version__,
            "base_model": self.base_fingerprint,
            "delta_sha256": sha256_file(delta_path),
            "delta_tensors": len(tensors),
        }
        write_atomic(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))

    def merge(self, **options: Any) -> nn.Module:
        """Fold the delta into the base weights and return the plain Hugging Face model (exact methods only).

        ``options`` go to the method: a model with one LoRA per task takes ``task=<name>``.
        """
        self._check_not_merged()
        merged = self.method.merge(self, **options)
        self._merged = True
        return merged


def wrap(
    model: nn.Module,
    config: MethodConfig,
    architecture: ArchitectureMap | None = None,
    data: Iterable[dict[str, torch.Tensor]] | None = None,
    saved: dict[str, torch.Tensor] | None = None,
) -> TunedModel:
    """Attach the method of ``config`` to ``model`` (modified in place) and freeze everything it does not train.

    ``architecture`` replaces the built-in map entry; ``data`` (task batches with labels) feeds methods that
    initialise from data, such as a Fisher-guided initialisation. ``saved``: a delta (tensors by name) the caller
    loads afterwards, as when resuming a run: methods then skip their data-driven initialisation and take
    data-dependent shapes (FISH's selected entries) from it, as :func:`load` does; ``data`` must then be None.
    """
    if saved is not None and data is not None:
        raise ValueError("wrap takes data (to initialise from) or saved (a delta to load afterwards), not both")
    context = AttachContext(data=data) if saved is None else AttachContext(saved=saved)
    return _wrap(model, config, architecture, context)


def _wrap(
    model: nn.Module, config: MethodConfig, architecture: ArchitectureMap | None, context: AttachContext
) -> TunedModel:
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a method config such as LoRAConfig, got {type(config).__name__}")
    base_fingerprint = fingerprint(model)
    backbone = resolve(model, architecture)
    to_save = resolve_module_names(model, config.modules_to_save, "modules_to_save", config)
    before = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    before |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for p in model.parameters():
        p.requires_grad_(False)
    method = get_method(config.method)(config)
    reason = method.unsupported_reason(backbone)
    if reason is not None:
        raise UnsupportedMethodError(f"method {config.method!r} cannot be applied to {type(model).__name__}: {reason}")
    method_modules = method.attach(model, backbone, context)
    heads = [m for _, m in backbone.task_heads()] if config.train_head else []
    for module in heads + [model.get_submodule(n) for n in to_save + always_trained_modules(model)]:
        module.requires_grad_(True)
    added = {f"base_model.{n}" for n, _ in model.named_parameters(remove_duplicate=False) if n not in before}
    added |= {f"base_model.{n}" for n, _ in model.named_buffers(remove_duplicate=False) if n not in before}
    if method_modules is not None:
        added |= {f"method_modules.{n}" for n, _ in method_modules.named_parameters()}
        added |= {f"method_modules.{n}" for n, _ in method_modules.named_buffers()}
    return TunedModel(model, method, backbone, base_fingerprint, method_modules, added)


def always_trained_modules(model: nn.Module) -> list[str]:
    """Modules a model declares that every method trains and saves (``model.leantune_trainable_modules``, e.g. the
    visual projection of a vision-language model): added by the model itself, so no method may leave them frozen."""
    names = list(getattr(model, "leantune_trainable_modules", ()))
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{type(model).__name__}.leantune_trainable_modules names {name!r}, which is not "
                              "one of its modules") from None
    return names


def load(
    base_model: nn.Module, directory: str | os.PathLike, architecture: ArchitectureMap | None = None
) -> TunedModel:
    """Wrap ``base_model`` with the method saved in ``directory`` and restore its delta; fail on any mismatch."""
    directory = Path(directory)
    record = _read_record(directory / CONFIG_NAME)
    config = _config_from_record(record, directory / CONFIG_NAME)
    _check_fingerprint(record["base_model"], fingerprint(base_model), directory)
    tensors = _read_delta(directory / DELTA_NAME, record["delta_sha256"])
    tuned = _wrap(base_model, config, architecture, AttachContext(saved=tensors))
    expected = tuned.delta_state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / DELTA_NAME} does not match method {config.method!r} on this model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, target in expected.items():
            value = tensors[name]
            if value.shape != target.shape:
                raise CheckpointError(
                    f"{directory / DELTA_NAME}: tensor {name} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(value)
    return tuned


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a leantune save directory")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    for key in ("method", "options", "base_model", "delta_sha256"):
        if key not in record:
            raise CheckpointError(f"{path} has no {key!r} entry")
    return record


def _config_from_record(record: dict[str, Any], path: Path) -> MethodConfig:
    name = record["method"]
    if name not in methods():
        raise CheckpointError(f"{path}: unknown method {name!r}; registered methods: {', '.join(methods())}")
    try:
        return get_method(name).config_class.from_options(**record["options"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid options for method {name!r}: {err}") from None


def _check_fingerprint(saved: dict[str, Any], actual: dict[str, Any], directory: Path) -> None:
    """Refuse a base model whose fingerprint differs from the saved one, naming what differs: the class, the
    config entries, or else the parameter layout. A record written before fingerprints held ``config_values``
    gets the differing hashes."""
    differing = [k for k in saved if k != "config_values" and saved.get(k) != actual.get(k)]
    if not differing:
        return
    if isinstance(saved.get("config_values"), dict):
        details = _differences(saved, actual)
    else:
        details = [f"{k}: saved {saved[k]!r}, this model {actual.get(k)!r}" for k in differing]
    shown = "; ".join(details[:MAX_DIFFERENCES_SHOWN])
    more = f"; and {len(details) - MAX_DIFFERENCES_SHOWN} more" if len(details) > MAX_DIFFERENCES_SHOWN else ""
    raise CheckpointError(f"{directory} was saved from another base model ({shown}{more})")


def _differences(saved: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words: class and type, then each differing config entry."""
    details = [f"{k}: saved {saved.get(k)}, this model {actual.get(k)}" for k in ("model_class", "model_type")
               if saved.get(k) != actual.get(k)]
    ours, theirs = saved["config_values"], actual.get("config_values", {})
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        before, now = ours.get(key, "(absent)"), theirs.get(key, "(absent)")
        if before == now:
            continue
        hashed = any(isinstance(v, str) and v.startswith("sha256:") for v in (before, now))
        details.append(f"{key} differs" if hashed else f"{key}: saved {before}, this model {now}")
    if not details:
        details.append(f"the parameter names or shapes differ ({saved.get('num_parameters')} parameters saved, "
                       f"{actual.get('num_parameters')} in this model)")
    return details


def _read_delta(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if sha256_file(path) != sha256:
        raise CheckpointError(f"{path} is corrupt or truncated: its checksum differs from the one saved with it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read as safetensors ({err})") from None
