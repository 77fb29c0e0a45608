"""The `navcache` command line, the top of the stack: it runs the provision-sortie flow (navcache_flows) and
the library's commands. Nothing below it imports it; ``python -m navcache`` runs it too."""

from .commands import app, main

__all__ = ["app", "main"]
