"""Artifact hashes checked once, then remembered: a stamp per file (device, inode -> size, mtime, ctime, sha256)
under the cache folder. A later load whose file has the same stamp skips re-reading it, so start-up reads no
multi-GB GGUF before llama.cpp maps it; any write to the file (new mtime or ctime, or size) makes it hash again.
`--verify-hashes` (and `edgevlm verify`) hash every file regardless."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_ALWAYS_REHASH = [False]  # process-wide: --verify-hashes


def always_rehash(on: bool = True) -> None:
    """Hash every artifact file on load, stamps or not (--verify-hashes, edgevlm verify)."""
    _ALWAYS_REHASH[0] = bool(on)


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVLM_CACHE_DIR") or Path.home() / ".cache" / "edgevlm")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_file(stat: os.stat_result) -> Path:
    return cache_root() / "hash-stamps" / f"{stat.st_dev}-{stat.st_ino}.json"


def _stamp(stat: os.stat_result, sha256: str) -> dict:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "sha256": sha256}


def remember(path: Path, sha256: str) -> None:
    """Record that `path`, as it is now, hashes to `sha256` (after an export or a full check). Best effort: a
    read-only cache only means the next load hashes again."""
    try:
        stat = path.stat()
        target = _stamp_file(stat)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_suffix(f".{os.getpid()}.tmp")
        staged.write_text(json.dumps(_stamp(stat, sha256)))
        os.replace(staged, target)
    except OSError:
        pass


def matches(path: Path, expected_sha256: str) -> bool:
    """Does the file hash to `expected_sha256`? From its stamp when the file is unchanged since it was stamped with
    that hash; else hashed now (and stamped when it matches)."""
    stat = path.stat()
    if not _ALWAYS_REHASH[0]:
        try:
            if json.loads(_stamp_file(stat).read_text()) == _stamp(stat, expected_sha256):
                return True
        except (OSError, ValueError):
            pass
    if sha256_file(path) != expected_sha256:
        return False
    remember(path, expected_sha256)
    return True
