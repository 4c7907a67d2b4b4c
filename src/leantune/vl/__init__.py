"""Vision and language: a vision-language model around any text backbone, and frozen image feature extraction."""

from leantune.vl.model import VISUAL_INPUTS, AnswerHead, VisionLanguageModel, VisualProjection, choice_logits

__all__ = ["VISUAL_INPUTS", "AnswerHead", "VisionLanguageModel", "VisualProjection", "choice_logits"]
