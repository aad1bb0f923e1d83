"""Sub-commands of the ``piip`` CLI (see :mod:`piip.cli`)."""
