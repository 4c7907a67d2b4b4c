"""Fisher-guided structured pruning of the backbone, used to initialise LST's side blocks (paper section 3.2).

1. Empirical Fisher: ``F[w] = sum over examples of (d loss / d w) ** 2`` from the task loss of the plain backbone,
   at most ``fisher_samples`` examples and ``fisher_fraction`` of the data (:func:`fisher_sample_count`) at
   batch size 1, eval mode (:func:`leantune.fisher.fisher_scores`, with its progress bar).
2. Row selection, walking each stack in order and carrying ``P``, the residual dimensions selected last: the
   embeddings give the first ``P`` (their Fisher summed over everything but the hidden dimension); in each block
   query/key/value keep the same rows (scored jointly by the L1 norm of ``F_q * F_k * F_v`` over the input
   columns ``P``), the attention output projection keeps ``d / r`` rows by its own score (a new ``P``), the
   feed-forward input keeps ``d_ff / r`` rows and its output ``d / r`` rows; norms and layer scales follow
   the ``P`` current where they sit. The decoder starts from the encoder's last ``P``; its cross-attention
   keys/values read the encoder's final ``P`` (the side encoder output).
3. Side block i gets the pruned weights of backbone block i (also when layers are dropped); the side final norm
   gets the pruned final norm. Down/up projections, gates and heads keep their fresh initialisation.

``fisher_pruning="rows"`` keeps any ``inner / r`` query/key/value rows (the paper's code); ``"head_aligned"``
keeps the ``d_kv / r`` best rows inside each head, so side head h is built from backbone head h.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from leantune.backbones import PROJECTION_ROLES, Backbone, Block, Stack, linear_weight_as_out_in
from leantune.fisher import example_count, fisher_scores

if TYPE_CHECKING:
    from leantune.methods.lst.config import LSTConfig
    from leantune.methods.lst.method import LadderSideTuning
    from leantune.methods.lst.network import LSTNetwork, SideBlock
# Per block: role -> (kept rows, kept input columns) for projections, role -> kept channels for norms/scales.
Selection = dict[str, Any]


def fisher_sample_count(config: LSTConfig, data: Any) -> int:
    """Examples the Fisher reads: ``fisher_samples``, capped at ``fisher_fraction`` of ``data``'s examples
    (rounded up) where ``data`` tells how many it holds (:func:`leantune.fisher.example_count`)."""
    available = example_count(data)
    if available is None:
        return config.fisher_samples
    return max(1, min(config.fisher_samples, math.ceil(config.fisher_fraction * available)))


def fisher_initialise(model: nn.Module, backbone: Backbone, method: LadderSideTuning, network: LSTNetwork,
                      data: Iterable[dict[str, torch.Tensor]], samples: int
                      ) -> dict[str, list[Selection] | torch.Tensor]:
    """Compute the Fisher from ``samples`` examples of ``data``, select rows, copy them into ``network``; return
    the selections (for inspection)."""
    config = method.config
    params = _fisher_parameters(model, backbone, method.stack_names)
    fisher = fisher_scores(model, params, data, samples, "empirical", "square")
    r, variant = config.reduction_factor, config.fisher_pruning
    first = backbone.stacks[method.stack_names[0]]
    carried = _embedding_dims(first, fisher, r)
    selections: dict[str, Any] = {}
    encoder_final = None
    for name in method.stack_names:
        stack = backbone.stacks[name]
        chosen, carried = select_stack(stack, fisher, carried, r, variant, encoder_final,
                                       pre_norm=backbone.arch.norm_position == "pre")
        selections[name], selections[f"{name}.final"] = chosen, carried
        encoder_final = carried
        side = network.stacks[name]
        for i in method.kept[name]:
            copy_block(stack.blocks[i], chosen[i], side.blocks[str(i)])
        if stack.final_norm is not None and side.final_norm is not None:
            _copy_norm(stack.final_norm[1], side.final_norm, carried)
    return selections


def _fisher_parameters(model: nn.Module, backbone: Backbone, stack_names: list[str]) -> dict[str, nn.Parameter]:
    """The weights whose Fisher the selection reads: every block projection and the first stack's embeddings.

    Roles a block does not have (a fused ``qkv``, cross-attention in an encoder) are skipped by ``Block.find``.
    """
    params: dict[str, nn.Parameter] = {}
    for name in stack_names:
        for block in backbone.stacks[name].blocks:
            for role in PROJECTION_ROLES:
                for path, module in block.find(role):
                    params[f"{path}.weight"] = module.weight
    path, embeddings = backbone.stacks[stack_names[0]].embeddings
    for sub, param in embeddings.named_parameters():
        params[f"{path}.{sub}"] = param
    return params


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in increasing index order."""
    return scores.topk(keep).indices.sort().values


def _embedding_dims(stack: Stack, fisher: dict[str, torch.Tensor], r: int) -> torch.Tensor:
    """The first carried set: hidden dims scored by the embeddings' Fisher summed over every other dim."""
    d = stack.hidden_size
    path = stack.embeddings[0]
    scores = torch.zeros(d)
    for name, values in fisher.items():
        if not name.startswith(path + "."):
            continue
        if values.shape[-1] == d:
            scores += values.reshape(-1, d).sum(0).cpu()
        elif values.dim() > 1 and values.shape[0] == d:  # a patch-embedding convolution: (d, channels, p, p)
            scores += values.reshape(d, -1).sum(1).cpu()
    return _top(scores, d // r)


def _joint_rows(importances: list[torch.Tensor], keep: int, heads: int | None) -> torch.Tensor:
    """Rows kept jointly for projections read together (q/k/v, or a gated feed-forward's two inputs).

    Score = L1 norm over the kept columns of the elementwise product of the importances (products of the
    per-projection L1 norms where their column sets differ, as for cross-attention). With ``heads``, the same
    number of rows is kept inside each head.
    """
    if all(imp.shape == importances[0].shape for imp in importances):
        product = importances[0].clone()
        for imp in importances[1:]:
            product *= imp
        scores = product.sum(1)
    else:
        scores = torch.ones(importances[0].shape[0])
        for imp in importances:
            scores = scores * imp.sum(1)
    if heads is None:
        return _top(scores, keep)
    per_head = scores.view(heads, -1)
    kept = per_head.topk(keep // heads, dim=1).indices + torch.arange(heads)[:, None] * per_head.shape[1]
    return kept.flatten().sort().values


def select_stack(stack: Stack, fisher: dict[str, torch.Tensor], carried: torch.Tensor, r: int, variant: str,
                 context_dims: torch.Tensor | None, pre_norm: bool) -> tuple[list[Selection], torch.Tensor]:
    """Walk the stack's blocks in order; return each block's selection and the final carried dims."""
    heads = stack.num_heads
    chosen = []
    for block in stack.blocks:
        def importance(role: str, block: Block = block) -> list[torch.Tensor]:
            return [fisher[f"{path}.weight"].cpu() for path, _ in block.find(role)]

        selection: Selection = {}
        carried = _select_attention(selection, importance, "", carried, carried, r, heads, variant, pre_norm)
        if block.find("cross_query"):
            carried = _select_attention(selection, importance, "cross_", carried, context_dims, r, heads, variant,
                                        pre_norm)
        ffn_in = importance("ffn_input")
        ff_rows = _joint_rows([imp[:, carried] for imp in ffn_in], ffn_in[0].shape[0] // r, None)
        selection["ffn_input"] = (ff_rows, carried)
        (wo,) = importance("ffn_output")
        out = _top(wo[:, ff_rows].sum(1), wo.shape[0] // r)
        selection["ffn_output"] = (out, ff_rows)
        selection["ffn_norm"] = carried if pre_norm else out
        selection["ffn_scale"] = out
        carried = out
        chosen.append(selection)
    return chosen, carried


def _select_attention(selection: Selection, importance, prefix: str, query_dims: torch.Tensor,
                      key_dims: torch.Tensor, r: int, heads: int, variant: str, pre_norm: bool) -> torch.Tensor:
    (fq,), (fk,), (fv,) = importance(prefix + "query"), importance(prefix + "key"), importance(prefix + "value")
    inner = fq.shape[0]
    rows = _joint_rows([fq[:, query_dims], fk[:, key_dims], fv[:, key_dims]], inner // r,
                       heads if variant == "head_aligned" else None)
    selection[prefix + "query"] = (rows, query_dims)
    selection[prefix + "key"] = selection[prefix + "value"] = (rows, key_dims)
    (fo,) = importance(prefix + "attention_output")
    out = _top(fo[:, rows].sum(1), fo.shape[0] // r)
    selection[prefix + "attention_output"] = (out, rows)
    selection[prefix + "attention_norm"] = query_dims if pre_norm else out
    selection[prefix + "attention_scale"] = out
    return out


def _copy_linear(source: nn.Module, rows: torch.Tensor, columns: torch.Tensor, target: nn.Linear) -> None:
    weight = linear_weight_as_out_in(source)
    target.weight.copy_(weight[rows.to(weight.device)][:, columns.to(weight.device)].float())
    if target.bias is not None:
        target.bias.copy_(source.bias[rows.to(weight.device)].float())


@torch.no_grad()
def _copy_norm(source: nn.Module, target: nn.Module, channels: torch.Tensor) -> None:
    index = channels.to(source.weight.device)
    target.weight.copy_(source.weight[index].float())
    if getattr(target, "bias", None) is not None:
        target.bias.copy_(source.bias[index].float())


@torch.no_grad()
def copy_block(block: Block, selection: Selection, side: SideBlock) -> None:
    """Copy the selected rows/columns of backbone ``block`` into ``side``."""
    for prefix, attention in (("", side.attention), ("cross_", side.cross_attention)):
        if attention is None:
            continue
        for role, target in (("query", attention.query), ("key", attention.key), ("value", attention.value),
                             ("attention_output", attention.output)):
            rows, columns = selection[prefix + role]
            _copy_linear(block.get(prefix + role)[1], rows, columns, target)
    rows, columns = selection["ffn_input"]
    for (_, source), target in zip(block.find("ffn_input"), side.ffn_input):
        _copy_linear(source, rows, columns, target)
    rows, columns = selection["ffn_output"]
    _copy_linear(block.get("ffn_output")[1], rows, columns, side.ffn_output)
    _copy_norm(block.get("attention_norm")[1], side.attention_norm, selection["attention_norm"])
    _copy_norm(block.get("ffn_norm")[1], side.ffn_norm, selection["ffn_norm"])
    if side.cross_attention_norm is not None:
        _copy_norm(block.get("cross_attention_norm")[1], side.cross_attention_norm,
                   selection["cross_attention_norm"])
    for role, target in (("attention_scale", side.attention_scale), ("ffn_scale", side.ffn_scale)):
        if target is not None:
            source = next(block.get(role)[1].parameters())
            target.copy_(source[selection[role].to(source.device)].float())
