"""The layout of a navigation cache directory: every folder name and file pattern, in one place.

Both sides read it: the provisioning library writes the cache (``navcache.*``, the Prefect tasks and
flow), ``navcache.gc`` sweeps it, and the onboard runtime reads it (:mod:`navcache_runtime.cache`, the
verifier's unlisted-file check, ``python -m navcache_runtime``). A cache root holds::

    manifest.dsse.json                    the signed manifest (MANIFEST_NAME)
    engines/<EngineName.filename>         compiled engines and exported models, each with a .sha256 sidecar
    descriptors/                          descriptor shards and the ground-side scan memo (.navcache-scan-*)
    index/index-{h}.faiss                 the FAISS index; h is 16 hex digits naming one build
    index/tiles-{h}.npy                   its tile table (row r is id r in the index)
    index/index-{h}.json                  its report
    coverage/                             the coverage table (.json) and map (.png)
    selftest/queries-{h}.npz              the onboard self-test's query views (and .navcache-scan-selftest-* memos)
    trust/root-N.json                     trust-root versions shipped with the cache
    .navcache.lock                        the ground-side writer lock (navcache.lock)

Files written atomically pass through a temp name ``.navcache-tmp-{pid}-{random}-{final name}`` beside
their final path (:func:`navcache_runtime.integrity.temp_path_for`). Paths inside the cache are relative
POSIX paths (what the manifest lists); the ``*_DIR`` names are single path components.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Final

MANIFEST_NAME: Final = "manifest.dsse.json"

ENGINES_DIR: Final = "engines"
DESCRIPTORS_DIR: Final = "descriptors"
INDEX_DIR: Final = "index"
COVERAGE_DIR: Final = "coverage"
SELFTEST_DIR: Final = "selftest"
TRUST_DIR: Final = "trust"

#: The artifact folders and the suffixes of the artifacts provisioning writes there (``navcache.gc``'s
#: units; anything else in them is left alone).
ARTIFACT_SUFFIXES: Final = MappingProxyType(
    {
        ENGINES_DIR: (".onnx", ".engine", ".pt2"),
        DESCRIPTORS_DIR: (".desc.npy", ".tiles.npy"),
        INDEX_DIR: (".faiss", ".npy", ".json"),
        COVERAGE_DIR: (".json", ".png"),
        SELFTEST_DIR: (".npz",),
    }
)

#: ``<artifact>.sha256``: the artifact's digest, written after it (navcache_runtime.integrity).
SIDECAR_SUFFIX: Final = ".sha256"
#: Prefix of an atomic write's temp file: ``.navcache-tmp-{pid}-{random}-{final name}``.
TEMP_PREFIX: Final = ".navcache-tmp-"
#: Prefix of ground-side scan-memo entries (never signed, never shipped as artifacts).
SCAN_MEMO_PREFIX: Final = ".navcache-scan-"
#: Prefix of the self-test's memo entries in ``selftest/``.
SELFTEST_MEMO_PREFIX: Final = SCAN_MEMO_PREFIX + "selftest-"
#: Suffix of lock files (the ground-side writer lock ``.navcache.lock`` among them).
LOCK_SUFFIX: Final = ".lock"
#: Files under the cache root that are never artifacts and never reported as unlisted (basename patterns).
UNLISTED_FILE_PATTERNS: Final = (f"{TEMP_PREFIX}*", f"{SCAN_MEMO_PREFIX}*", f"*{LOCK_SUFFIX}")

#: ``index/index-{h}.faiss``; group 1 is h.
INDEX_FILE: Final = re.compile(rf"{INDEX_DIR}/index-([0-9a-f]{{16}})\.faiss")
#: A trust-root version file inside ``trust/``; group 1 is its version.
TRUST_ROOT_FILE: Final = re.compile(r"root-([1-9][0-9]{0,8})\.json")
#: A shipped trust-root version, as a path relative to the cache root.
SHIPPED_TRUST_ROOT: Final = re.compile(rf"{TRUST_DIR}/{TRUST_ROOT_FILE.pattern}")


def index_table_file(build: str) -> str:
    """``index/tiles-{build}.npy``: the tile table of the index ``build``."""
    return f"{INDEX_DIR}/tiles-{build}.npy"


def index_report_file(build: str) -> str:
    """``index/index-{build}.json``: the report of the index ``build``."""
    return f"{INDEX_DIR}/index-{build}.json"
