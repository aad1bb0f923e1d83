"""Process-wide on/off settings of piip's optional fast paths (oneDNN linears, the feature-path
fold, Winograd convolutions, the opaque ops of compiled graphs, ...): one implementation of the
environment default and the ``set_enabled`` / ``enabled`` pair each of those modules exposes."""
from __future__ import annotations

import os


class Switch:
    """One setting, read from the environment variable ``env`` at import: a default-on path is
    turned off by ``env=0``, a default-off one turned on by ``env=1``. Callers read ``.on``; under
    ``torch.compile`` Dynamo guards on that attribute as it does on a module global, so a graph
    traced with one setting is traced again after :meth:`set` changes it."""

    def __init__(self, env: str, default: bool = True) -> None:
        self.env = env
        value = os.environ.get(env, "1" if default else "0")
        self.on = value != "0" if default else value == "1"

    def set(self, flag: bool) -> bool:
        """Turn the path on or off (process-wide); returns the previous setting."""
        previous, self.on = self.on, bool(flag)
        return previous

    def get(self) -> bool:
        """Whether the path is on."""
        return self.on

    def __repr__(self) -> str:
        return f"Switch({self.env}={'on' if self.on else 'off'})"
