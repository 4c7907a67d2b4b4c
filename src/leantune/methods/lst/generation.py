"""Decoding through the side network with transformers' own ``generate``.

While ``tuned.generate(...)`` runs, the base model's forward returns the side network's logits instead of its own,
so every decoding strategy of ``GenerationMixin.generate`` (greedy, beam search, sampling, logits processors,
stopping criteria, ``generation_config``) works unchanged:

- forward hooks record the ladders of the backbone encoder (run once by ``generate``) and of the backbone decoder
  (every step); when the encoder has run, the side encoder runs on its ladders;
- after every forward of the base model, the side decoder runs on that step's decoder ladders and the frozen LM
  head on its output replaces the backbone's logits;
- the backbone and the side network run in eval mode, and the hooks are removed when ``generate`` returns.

Caching (``use_cache``, transformers' default): leantune gives ``generate`` an ``EncoderDecoderCache`` whose layers
grow on demand. The backbone decoder fills layers ``0 .. L-1`` of its self-attention cache; the side decoder keeps
its self-attention keys/values in further layers ``L ..`` of the same cache (``Cache.update``), so beam search
reorders backbone and side together. The side cross-attention keys/values are computed once per call: all rows
of one input share its side encoder output, and ``generate`` expands inputs with ``repeat_interleave`` and only
reorders rows within one input. Without a cache, every step recomputes the side decoder over the whole prefix.

A vision-language model generates through its text model on the text only; its visual tokens join the side
encoder (and the side decoder's cross-attention keys) when the backbone encoder has run.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

from leantune.errors import UnsupportedMethodError
from leantune.layers.attention import KeyValueCache
from leantune.methods.lst.network import BlockCache, padding_keep, self_attention_mask
from leantune.vl.model import VISUAL_INPUTS, text_model_of

if TYPE_CHECKING:
    from leantune.api import TunedModel
    from leantune.methods.lst.method import LadderSideTuning


class CacheLayer(KeyValueCache):
    """A side self-attention cache stored as layer ``index`` of a transformers ``Cache``."""

    def __init__(self, cache: Cache, index: int) -> None:
        super().__init__()
        self.cache, self.index = cache, index

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(key, value, self.index)


def cache_argument(model: nn.Module) -> str:
    """The name the model's forward (and ``generate``) takes its key/value cache under (renamed in transformers 5)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(method: LadderSideTuning, tuned: TunedModel, *args: Any, **kwargs: Any) -> Any:
    """``tuned.base_model.generate(*args, **kwargs)`` with the side network's logits."""
    model = tuned.base_model
    with torch.no_grad():
        visual = method.visual_inputs(model, *(kwargs.pop(k, None) for k in VISUAL_INPUTS))
    kwargs.pop("loss_weights", None)
    text = text_model_of(model)
    name = cache_argument(text)
    if kwargs.get(name) is not None:
        raise UnsupportedMethodError(f"lst generate() keeps the side decoder's keys and values in a cache of its "
                                     f"own; do not pass {name}")
    settings = kwargs.get("generation_config") or text.generation_config
    cache = None
    if kwargs.get("use_cache", settings.use_cache):
        cache = kwargs[name] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with _side_logits(method, tuned, cache, visual):
        return text.generate(*args, **kwargs)


@contextlib.contextmanager
def _side_logits(method: LadderSideTuning, tuned: TunedModel, cache: EncoderDecoderCache | None,
                 visual: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
    """While active, the base model's forward returns the side network's logits (both in eval mode)."""
    model, network = tuned.base_model, tuned.method_modules
    text = text_model_of(model)
    side_decoder = network.stacks["decoder"]
    first_side_layer = len(method.backbone.stacks["decoder"].blocks)  # side cache layers after the backbone's
    cross_caches = {i: KeyValueCache() for i in method.kept["decoder"]}
    encoded: dict[str, torch.Tensor] = {}

    def after_encoder(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        mask = kwargs.get("attention_mask")
        encoded["mask"] = torch.ones(output[0].shape[:2], dtype=torch.long, device=output[0].device) \
            if mask is None else mask
        encoded["side"] = method.side_encode(network, encoder_ladders, encoded["mask"], visual)
        if visual is not None:
            encoded["visual_mask"] = visual[1]

    def after_model(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        rows, length = decoder_ladders[-1].shape[:2]
        if encoded["side"].shape[0] != rows:  # generate expanded each input to beams / returned sequences
            copies = rows // encoded["side"].shape[0]
            encoded.update({k: v.repeat_interleave(copies, dim=0) for k, v in encoded.items()})
        side_encoded = encoded["side"]
        encoder_mask = kwargs.get("attention_mask")
        encoder_mask = encoded["mask"] if encoder_mask is None else encoder_mask
        if "visual_mask" in encoded:  # the side decoder attends to the text and the visual tokens
            encoder_mask = torch.cat([encoder_mask, encoded["visual_mask"].to(encoder_mask.dtype)], dim=1)
        caches, past = None, 0
        if cache is not None:
            own = cache.self_attention_cache
            past = own.get_seq_length(first_side_layer)
            caches = {i: BlockCache(CacheLayer(own, first_side_layer + j), cross_caches[i])
                      for j, i in enumerate(method.kept["decoder"])}
        mask = self_attention_mask(None, length, True, side_decoder.position_bias, side_encoded.device, past)
        side = side_decoder(decoder_ladders, mask, side_encoded, padding_keep(encoder_mask), caches)
        output.logits = method.lm_logits(text, network, side)
        return output

    with contextlib.ExitStack() as stack:
        for module in (model, network):
            stack.callback(module.train, module.training)
            module.eval()
        encoder_ladders = stack.enter_context(method.recording("encoder"))
        decoder_ladders = stack.enter_context(method.recording("decoder"))
        for module, hook in ((text.get_encoder(), after_encoder), (text, after_model)):
            stack.callback(module.register_forward_hook(hook, with_kwargs=True).remove)
        yield
