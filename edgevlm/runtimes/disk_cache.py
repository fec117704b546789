"""The disk tier of the caches (`edgevlm serve --cache-dir`): image embeddings and image-prefix KV states that
survive a restart. One file per entry, bounded in bytes (least recently used go first). A file is written under a
temporary name and renamed, and read back only when its magic, its header (the namespace it was written for, its
key, its size) and the sha256 of its payload all match: a truncated, foreign or stale file is deleted, never loaded.
A KV state's namespace is the decoder's state signature (artifact sha256, KV type, context settings), so a q8_0
state is never restored into a q4_k_m decoder."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

MAGIC = b"EDGEVLM-CACHE 1\n"
SUFFIX = ".evc"


class DiskCache:
    def __init__(self, folder: str | Path, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.lock = threading.Lock()
        self.hits = self.misses = self.rejected = 0
        for stale in self.folder.glob(".*.tmp-*"):  # a write that a crash interrupted
            stale.unlink(missing_ok=True)

    def _path(self, namespace: str, key: str) -> Path:
        return self.folder / (hashlib.sha256(f"{namespace}\0{key}".encode()).hexdigest()[:40] + SUFFIX)

    def has(self, namespace: str, key: str) -> bool:
        """An entry may be there (it is checked when read)."""
        return self._path(namespace, key).is_file()

    def get(self, namespace: str, key: str) -> tuple[dict, bytes] | None:
        """(header, payload) or None; a file that does not check out is deleted."""
        path = self._path(namespace, key)
        try:
            with open(path, "rb") as handle:
                if handle.read(len(MAGIC)) != MAGIC:
                    raise ValueError("magic")
                header = json.loads(handle.readline(65536))
                payload = handle.read()
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError):
            self._reject(path)
            return None
        if (not isinstance(header, dict) or header.get("namespace") != namespace or header.get("key") != key
                or header.get("nbytes") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest()):
            self._reject(path)
            return None
        os.utime(path)  # recently used
        self.hits += 1
        return header, payload

    def _reject(self, path: Path) -> None:
        self.rejected += 1
        self.misses += 1
        path.unlink(missing_ok=True)

    def put(self, namespace: str, key: str, payload: bytes, **meta) -> bool:
        if len(payload) > self.max_bytes:
            return False
        header = {"namespace": namespace, "key": key, "nbytes": len(payload),
                  "sha256": hashlib.sha256(payload).hexdigest(), **meta}
        path = self._path(namespace, key)
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        with self.lock:
            try:
                with open(temp, "wb") as handle:
                    handle.write(MAGIC + json.dumps(header).encode() + b"\n")
                    handle.write(payload)
                os.replace(temp, path)
            except OSError:
                temp.unlink(missing_ok=True)
                return False
            self._evict()
        return True

    def _evict(self) -> None:
        entries = []
        for path in self.folder.glob("*" + SUFFIX):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    # ---- typed helpers ---------------------------------------------------------------------------------------
    def get_array(self, namespace: str, key: str) -> np.ndarray | None:
        found = self.get(namespace, key)
        if found is None:
            return None
        header, payload = found
        try:
            return np.frombuffer(payload, dtype=np.dtype(header["dtype"])).reshape(header["shape"]).copy()
        except (KeyError, TypeError, ValueError):
            self._reject(self._path(namespace, key))
            return None

    def put_array(self, namespace: str, key: str, array: np.ndarray) -> bool:
        array = np.ascontiguousarray(array)
        return self.put(namespace, key, array.tobytes(), dtype=array.dtype.str, shape=list(array.shape))
