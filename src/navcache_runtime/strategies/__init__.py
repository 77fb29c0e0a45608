"""Concrete runtime strategies. Each module imports its third-party library itself; import them only
through :func:`navcache_runtime.build_inference_runtime`, which does so lazily."""
