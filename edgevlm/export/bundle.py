"""Atomic bundle writing: everything goes into a hidden temporary folder beside the target, which is renamed into
place only after the manifest is written. An interrupted export leaves no bundle (and cleans its temporary)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..errors import BadInputError
from ..manifest import MANIFEST, Artifact, FileEntry, Manifest, sha256_file


class BundleWriter:
    def __init__(self, root: Path):
        self.root = root  # the temporary folder while writing

    def file_entries(self, relpath: str) -> list[FileEntry]:
        target = self.root / relpath
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        return [FileEntry(p.relative_to(self.root).as_posix(), sha256_file(p), p.stat().st_size) for p in files]

    def artifact(self, name: str, role: str, fmt: str, precision: str, relpath: str, extra_files: tuple[str, ...] = (), **details) -> Artifact:
        entries = self.file_entries(relpath)
        for extra in extra_files:
            entries += self.file_entries(extra)
        return Artifact(name, role, fmt, precision, relpath, entries, details)


@contextmanager
def write_bundle(target: str | Path, manifest: Manifest, overwrite: bool = False) -> Iterator[BundleWriter]:
    """Yield a writer on a temporary folder; the caller appends artifacts to ``manifest.artifacts``."""
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise BadInputError(f"{target} already exists; choose another -o or pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield BundleWriter(temp)
        shutil.rmtree(temp / ".work", ignore_errors=True)  # intermediates (fp32 graph, F32 GGUF) shared by variants
        manifest.edgevlm_version = __version__
        (temp / MANIFEST).write_text(manifest.to_json())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            temp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temp.rename(target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
