"""One file per tuning method; each registers itself with :func:`leantune.registry.register`."""
