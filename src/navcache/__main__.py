"""``python -m navcache``: the `navcache` command line (:mod:`navcache_cli`, which sits above the flow layer;
nothing in the library imports this module)."""

from navcache_cli import main

main()
