"""Sub-commands of the ``leantune`` CLI, one module each (see ``leantune.cli``)."""
