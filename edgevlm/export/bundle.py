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
from ..hash_stamps import remember
from ..manifest import MANIFEST, Artifact, FileEntry, Manifest, sha256_file


class BundleWriter:
    def __init__(self, root: Path):
        self.root = root  # the temporary folder while writing

    def file_entries(self, relpath: str) -> list[FileEntry]:
        target = self.root / relpath
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        entries = [FileEntry(p.relative_to(self.root).as_posix(), sha256_file(p), p.stat().st_size) for p in files]
        for path, entry in zip(files, entries):
            remember(path, entry.sha256)  # hashed here: the first load need not read the file again
        return entries

    def artifact(self, name: str, role: str, fmt: str, precision: str, relpath: str, extra_files: tuple[str, ...] = (), **details) -> Artifact:
        entries = self.file_entries(relpath)
        for extra in extra_files:
            entries += self.file_entries(extra)
        return Artifact(name, role, fmt, precision, relpath, entries, details)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def recover_interrupted(target: Path) -> None:
    """Clean up after exports of `target` that were killed (kill -9, OOM killer, power loss), as long as the process
    that wrote them is gone: a `.NAME.partial-PID-*` folder is removed, and a `.NAME.old-PID` folder (the previous
    bundle, moved aside just before the new one was renamed in) is put back when the target is missing."""
    for leftover in sorted(target.parent.glob(f".{target.name}.*")):
        kind, _, rest = leftover.name[len(target.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not target.exists() and (leftover / MANIFEST).is_file():
            leftover.rename(target)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def write_bundle(target: str | Path, manifest: Manifest, overwrite: bool = False) -> Iterator[BundleWriter]:
    """Yield a writer on a temporary folder; the caller appends artifacts to ``manifest.artifacts``. At every moment
    the target is either absent, the previous complete bundle, or the new complete one (a kill between the two
    renames leaves the previous one aside, which the next export of the target puts back)."""
    target = Path(target).absolute()
    if target.parent.is_dir():
        recover_interrupted(target)
    if target.exists() and not overwrite:
        raise BadInputError(f"{target} already exists; choose another -o or pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield BundleWriter(temp)
        shutil.rmtree(temp / ".work", ignore_errors=True)  # intermediates (fp32 graph, F32 GGUF) shared by variants
        manifest.edgevlm_version = __version__
        manifest_tmp = temp / f"{MANIFEST}.tmp"
        manifest_tmp.write_text(manifest.to_json())
        manifest_tmp.rename(temp / MANIFEST)  # a folder with manifest.json is complete
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
