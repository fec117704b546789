"""Content-addressed bundles: a bundle's id is the hash of what made it (checkpoint weights, the export request, the
exporter options and edgevlm's version), so the same cell is exported once and a changed input gets a new id. Bundles
live in a store folder that every node reaches (shared storage); a node checks a bundle against its manifest's
sha256s before using it. GB-sized artifacts never travel through the executor."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from ..errors import BundleError

IDENTITY = "sweep-bundle.json"  # written beside manifest.json: what the id was computed from


@lru_cache(maxsize=None)
def checkpoint_digest(path: str) -> str:
    """sha256 of config.json and the weights (as the exporter records in a bundle's source)."""
    from ..families.files import checkpoint_sha256

    folder = Path(path)
    return checkpoint_sha256(folder, sorted(folder.glob("*.safetensors")))


def export_request(encoder: str, decoder: str) -> tuple[str, str]:
    """The artifacts exported for a cell: a TensorRT encoder is built on the device from the fp32 ONNX graph."""
    return ("onnx:fp32" if encoder.startswith("tensorrt:") else encoder), decoder


def identity(checkpoint: str, encoder: str, decoder: str, max_tiles: int) -> dict:
    from .. import __version__

    exported_encoder, exported_decoder = export_request(encoder, decoder)
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_digest(str(checkpoint)),
            "encoder": exported_encoder, "decoder": exported_decoder, "max_tiles": max_tiles,
            "edgevlm_version": __version__}


def bundle_id(identity_: dict) -> str:
    """The first 20 hex digits of the sha256 of the identity without the checkpoint's path (a moved checkpoint keeps
    its bundles)."""
    keyed = {k: v for k, v in identity_.items() if k != "checkpoint"}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]


def verified_bundle(store: Path, ident: str) -> Path:
    """The bundle folder for `ident`, every artifact checked against its manifest's sha256 (BundleError otherwise)."""
    from ..manifest import Manifest

    folder = Path(store) / ident
    if not (folder / "manifest.json").is_file():
        raise BundleError(f"bundle {ident} is not in the store {store} (its export stage has not run here)")
    manifest = Manifest.load(folder)
    for artifact in manifest.artifacts:
        artifact.verify(folder)
    return folder


def is_exported(store: Path, ident: str) -> bool:
    return (Path(store) / ident / IDENTITY).is_file() and (Path(store) / ident / "manifest.json").is_file()
