"""The training engine: ``loop`` (the trainer), ``checkpoint``, ``distributed``, ``config``, ``data``."""
