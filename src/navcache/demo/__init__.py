"""The demo sortie's assets, generated on first use with no downloads, so ``navcache demo`` provisions a
cache on a fresh machine.

:func:`ensure_demo_assets` fills ``DEMO_DIR/generated/`` with the files ``examples/demo/sortie.toml`` names:

    ortho.tif                                    the orthophoto (:mod:`.landscape`)
    models/{tiny_vpr,local_features}.{onnx,pt2}  the two backbones (:mod:`.models`)
    keys/operator.key, keys/trusted_keys.json    written by the caller's key hook (keys live with signing)

It is idempotent: an orthophoto present is kept, models present and valid are kept, and the key hook runs
only while ``keys/operator.key`` is missing. The orthophoto is byte-identical for the same arguments and the
models' weights come from fixed seeds.

Modules: :mod:`.landscape` renders the orthophoto; :mod:`.backbones` holds the networks in plain torch
(``TinyVPR`` is also the tests' and benchmarks' small but real model); :mod:`.models` exports the demo's
model files. Importing this package does not import torch; exporting a model does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .landscape import generate_orthophoto, orthophoto_grid
from .models import generate_demo_models

__all__ = [
    "KEYS_DIR",
    "MODELS_DIR",
    "OPERATOR_KEY",
    "ORTHO_NAME",
    "ensure_demo_assets",
    "generate_demo_models",
    "generate_orthophoto",
    "orthophoto_grid",
]

logger = logging.getLogger(__name__)

ORTHO_NAME = "ortho.tif"
MODELS_DIR = "models"
KEYS_DIR = "keys"
OPERATOR_KEY = "operator.key"


def ensure_demo_assets(demo_dir: Path, make_keys: Callable[[Path], None] | None = None) -> None:
    """Create ``demo_dir/generated/`` with the orthophoto and the models when missing (idempotent).

    Keys: when ``generated/keys`` lacks ``operator.key`` and ``make_keys`` is given, it is called with
    that folder (key generation lives with the signing code)."""
    generated = Path(demo_dir) / "generated"
    generated.mkdir(parents=True, exist_ok=True)
    ortho = generated / ORTHO_NAME
    if ortho.is_file():
        logger.debug("demo orthophoto %s present, kept", ortho)
    else:
        generate_orthophoto(ortho)
    generate_demo_models(generated / MODELS_DIR)
    keys = generated / KEYS_DIR
    if not (keys / OPERATOR_KEY).is_file():
        if make_keys is None:
            logger.info("demo keys missing in %s and no key generator given; signing will need them", keys)
        else:
            keys.mkdir(parents=True, exist_ok=True)
            make_keys(keys)
            logger.info("generated demo keys in %s", keys)
