"""Pre-flight check of the navigation cache: GO only when the cache verifies, opens and answers a query.

An example consumer of the onboard runtime contract (docs/runtime-contract.md, version 1.x). It uses the
public surface only — ``navcache_runtime.open_cache``, ``OnboardCache``, ``CacheVerificationError`` and the
``InferenceRuntimeError`` family — and runs with the base install plus the extras the airframe flies with
(``navcache[ort,faiss]`` for ONNX Runtime engines).

    python examples/onboard/takeoff_check.py CACHE --trusted-keys trusted_keys.json [--state STATE.json]

Exit codes: 0 GO, 1 NO-GO (the cache refused or cannot be used), 2 usage error. The last line of output is
the verdict, ``GO: ...`` or ``NO-GO: ...``; ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import navcache_runtime as nr

CONTRACT_MAJOR = 1  # the contract version this consumer was written against


def check(
    cache_dir: Path,
    trusted_keys: Path,
    *,
    state_path: Path | None = None,
    runtime_config: Path | None = None,
    vpr_model: str | None = None,
) -> dict[str, Any]:
    """Verify and open the cache, push one frame through the VPR engine and query the index.

    Returns the verdict as a dict (``go``, ``reason`` and what was checked); never raises for a cache
    problem — every refusal of the runtime is an ``InferenceRuntimeError`` and becomes a NO-GO."""
    options: dict[str, Any] = {"vpr_model": vpr_model, "runtime_config": runtime_config}
    if state_path is not None:  # the device's rollback record; otherwise open_cache's default applies
        options["state_path"] = state_path
    try:
        with nr.open_cache(cache_dir, trusted_keys, **options) as cache:
            report = cache.report
            shape = cache.input_shape
            if shape is None:  # a runtime that does not report its input size: a grey frame of the tile size
                raise nr.InferenceError("the VPR engine does not report its input size", hint="pass --vpr-model")
            frame = np.full((shape[1], shape[2], 3), 128, np.uint8)  # a camera frame's format: RGB uint8
            descriptor = cache.describe(cache.preprocess(frame))[0]
            hits = cache.query(descriptor, k=3)
            if not hits:
                raise nr.CacheOpenError("the index answered a query with no candidates", hint="re-provision")
            return {
                "go": True,
                "reason": f"cache verified ({len(report.artifacts)} artifacts) and answers queries",
                "sortie": report.sortie_id,
                "version": report.version,
                "expires": report.expires,
                "tiles": cache.tile_count,
                "engines": list(cache.engine_models),
                "vpr_model": cache.vpr_model,
                "runtime": cache.runtime.current_runtime_label(),
            }
    except nr.CacheVerificationError as exc:
        failures = [f"{f.code}: {f.subject}" for f in exc.report.failures]
        return {"go": False, "reason": "the cache did not verify", "failures": failures}
    except nr.InferenceRuntimeError as exc:  # engine gate, missing library (faiss, onnxruntime), bad config
        return {"go": False, "reason": str(exc), "error": type(exc).__name__}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="the cache directory (mounted read-only)")
    parser.add_argument("--trusted-keys", type=Path, required=True, help="the operator keys file")
    parser.add_argument("--state", type=Path, help="the device's state file (rollback protection)")
    parser.add_argument("--runtime-config", type=Path, help="a runtime TOML file (default: from the engines)")
    parser.add_argument("--vpr-model", help="the VPR backbone's model name, when the cache has several")
    parser.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    args = parser.parse_args(argv)
    if int(nr.__version__.split(".")[0]) != CONTRACT_MAJOR:
        parser.exit(2, f"error: written for runtime contract {CONTRACT_MAJOR}.x, installed is {nr.__version__}\n")
    if not args.cache.is_dir():
        parser.exit(2, f"error: cache directory {args.cache} does not exist\n")
    if not args.trusted_keys.is_file():
        parser.exit(2, f"error: trusted keys file {args.trusted_keys} does not exist\n")

    verdict = check(
        args.cache,
        args.trusted_keys,
        state_path=args.state,
        runtime_config=args.runtime_config,
        vpr_model=args.vpr_model,
    )
    if args.json:
        print(json.dumps(verdict, sort_keys=True))
    else:
        for failure in verdict.get("failures", []):
            print(f"  FAIL {failure}")
        if verdict["go"]:
            print(
                f"GO: sortie {verdict['sortie']} version {verdict['version']} expires {verdict['expires']}; "
                f"{verdict['tiles']} tiles, engines {', '.join(verdict['engines'])} ({verdict['runtime']})"
            )
        else:
            print(f"NO-GO: {verdict['reason']}")
    return 0 if verdict["go"] else 1


if __name__ == "__main__":
    sys.exit(main())
