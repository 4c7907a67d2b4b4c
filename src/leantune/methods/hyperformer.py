"""Hyperformer (Karimi Mahabadi et al. 2021) as in VL-Adapter: adapters whose weights a hypernetwork generates
for each (task, layer, position) at every call (:mod:`leantune.layers.hypernetwork`).

Task embeddings (512-d, one set shared by the encoder and the decoder) and per-stack layer embeddings go through
the stack's task MLP (1024 -> 128 -> ReLU -> 8 -> LayerNorm); per position type (self-attention, cross-attention,
feed-forward) and stack, generators produce the adapter's down and up weights and biases. Placement, width and
activation are VL-Adapter's (``all``, d/8, gelu_new); LayerNorms train too. With ``zero_init_up`` the up
generators start at zero, so the wrapped model equals the base model at init.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leantune.backbones import Backbone
from leantune.config import MethodConfig, check_choice, check_positive, option
from leantune.context import CallInput
from leantune.layers.adapter import ACTIVATIONS
from leantune.layers.hypernetwork import GeneratedAdapter, HyperformerModules, StackHypernetwork
from leantune.methods.base import AttachContext, TuningMethod, add_branch
from leantune.methods.sharing import PLACEMENT_SUBLAYERS, check_task_names, placement_positions
from leantune.registry import register

BRANCH = "hyperformer"


@dataclass
class HyperformerConfig(MethodConfig):
    """Hypernetwork-generated adapters for several tasks."""

    method = "hyperformer"

    tasks: list[str] | None = option(
        None, "Task names; every call passes task=<name or index> (None = one task, no task input needed).")
    reduction_factor: int = option(8, "Adapter bottleneck width is hidden_size // reduction_factor.")
    task_embedding_dim: int = option(512, "Width of the task and layer embeddings.")
    hypernet_hidden: int = option(128, "Hidden width of the task MLP.")
    projected_task_dim: int = option(8, "Width of the task MLP's output, the generators' input.")
    activation: str = option("gelu_new", f"Non-linearity in the adapters: {', '.join(ACTIVATIONS)}.")
    placement: str = option("all", "houlsby, pfeiffer or all (after self-attention, cross-attention and "
                                   "feed-forward; VL-Adapter).")
    zero_init_up: bool = option(True, "Start the up generators at zero, so the model starts as the base model.")
    train_norms: bool = option(True, "Also train every LayerNorm/RMSNorm (VL-Adapter: True).")

    def validate(self) -> None:
        check_positive(self, "reduction_factor", "task_embedding_dim", "hypernet_hidden", "projected_task_dim")
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_choice(self, "placement", tuple(PLACEMENT_SUBLAYERS))
        check_task_names(self)


@register
class Hyperformer(TuningMethod):
    name = "hyperformer"
    config_class = HyperformerConfig
    identity_at_init = True
    default_learning_rate = 1e-3

    def declared_inputs(self) -> tuple[CallInput, ...]:
        """``task``, when the method knows task names; without them every call uses the one ``default`` task."""
        tasks = self.config.tasks or []
        if not tasks:
            return ()
        return (CallInput("task", "the batch's task name or index", required=len(tasks) > 1,
                          choices=tuple(tasks) or None),)

    def unsupported_reason(self, backbone: Backbone) -> str | None:
        for stack in backbone.stacks.values():
            widths = {block.hidden_size for block in stack.blocks}
            if len(widths) > 1:
                return f"its {stack.name} stack changes width between stages ({sorted(widths)}); one generator " \
                       "per position type needs one width"
        return None

    def attach(self, model: nn.Module, backbone: Backbone, context: AttachContext) -> HyperformerModules:
        config: HyperformerConfig = self.config
        positions = placement_positions(backbone, config.placement)
        hypernetworks = {}
        for stack in backbone.stacks.values():
            sublayers = [sublayer for block, sublayer, _, _ in positions if block.stack == stack.name]
            if not sublayers:
                continue
            hidden = stack.hidden_size
            hypernetworks[stack.name] = StackHypernetwork(
                len(stack.blocks), list(dict.fromkeys(sublayers)), hidden, max(1, hidden // config.reduction_factor),
                config.task_embedding_dim, config.hypernet_hidden, config.projected_task_dim, config.zero_init_up)
        like = next(model.parameters())
        shared = HyperformerModules(config.tasks or ["default"], config.task_embedding_dim, hypernetworks)
        shared.to(device=like.device)
        for block, sublayer, _, module in positions:
            add_branch(module, BRANCH, GeneratedAdapter(shared, block.stack, block.index, sublayer,
                                                        ACTIVATIONS[config.activation]()))
        if config.train_norms:
            for _, norm in backbone.norm_modules():
                norm.requires_grad_(True)
        return shared
