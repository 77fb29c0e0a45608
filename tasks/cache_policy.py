"""A content-hash cache policy for engine builds.

Prefect's INPUTS policy hashes a Path argument by its *string* and DEFAULT adds RUN_ID (never hits across
runs); both are wrong for engines. This key covers what decides the engine: the source model's bytes, the
host identity, runtime label, precision, profile and builder options, and the library version — plus the
verified digest of the engine file the build would reuse, so a cache record can never vouch for an engine
file that changed or vanished after it was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

import navcache
import navcache_runtime
from navcache_runtime import InferenceRuntimeError, build_inference_runtime, sha256_file


@dataclass
class EngineContentPolicy(CachePolicy):
    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        backbone = inputs["backbone"]
        runtime_config = inputs["runtime_config"]
        host = inputs["host"]
        try:
            runtime = build_inference_runtime(runtime_config)
            source = runtime.resolve_source(backbone.onnx)  # type: ignore[attr-defined]
            candidates = runtime.expected_artifacts(backbone.onnx, backbone.build_config)  # type: ignore[attr-defined]
            engine_state = []
            for candidate in candidates:
                if candidate.exists():
                    # admit() streams the file once and returns the digest it verified.
                    admitted = runtime.gate.admit(candidate)  # type: ignore[attr-defined]
                    engine_state.append((candidate.name, admitted.sha256))
        except InferenceRuntimeError:
            return None  # cannot predict or verify: no caching, let the task decide and report
        if not engine_state:
            return None  # nothing built yet: a record written now would outlive the engine it names
        return hash_objects(
            "navcache-engine-v1",
            sha256_file(backbone.onnx),
            sha256_file(source) if source != backbone.onnx else None,
            backbone.build_config.digest(),
            backbone.build_config.precision,
            runtime_config.runtime,
            host.identity(),
            engine_state,
            # The record names a file: it may only be reused by runs on the same cache root.
            str(runtime_config.engine_dir.resolve()),
            navcache.__version__,
            navcache_runtime.__version__,
        )
