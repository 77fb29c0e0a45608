"""Everything that can be wrong with a sortie's inputs, checked before anything is written."""

from __future__ import annotations

from pathlib import Path

from shapely.geometry import box

from .errors import SourceError
from .imagery import open_tile_source
from .sortie import Sortie, load_sortie, validate_models


def check_source_covers_area(sortie: Sortie) -> None:
    with open_tile_source(sortie.orthophoto.kind, sortie.orthophoto.path, sortie.tiles.size) as source:
        bounds = source.bounds_lonlat()
    if not box(*bounds).intersects(sortie.area):
        raise SourceError(
            f"the orthophoto covers lon {bounds[0]:.5f}..{bounds[2]:.5f}, lat {bounds[1]:.5f}..{bounds[3]:.5f}, "
            "which does not overlap the sortie area",
            where=str(sortie.orthophoto.path),
            hint="point [orthophoto] at imagery of the flight area, or fix [area]",
        )


def preflight(sortie_path: Path, cache_dir: Path | None = None) -> Sortie:
    """Load and validate the sortie file, its models and its imagery; raise a NavcacheError naming the
    problem. Writes nothing."""
    sortie = load_sortie(sortie_path, cache_dir_override=cache_dir)
    validate_models(sortie)
    check_source_covers_area(sortie)
    for path, what in ((sortie.signing_key, "signing_key"), (sortie.trusted_keys, "trusted_keys")):
        if path is not None and not path.is_file():
            raise SourceError(
                f"{what} {path} does not exist",
                where=f"{sortie_path} {what}",
                hint="create a key pair with `navcache keygen --dir DIR` and point the sortie at it",
            )
    return sortie
