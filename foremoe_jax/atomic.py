"""Atomic file writes: a run killed mid-write leaves the old file or the new one under the real name,
never half of one (summary.json, plots, exported safetensors and their JSON files)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside `path` to write; renamed onto `path` when the block succeeds (a
  rename within one directory is atomic on POSIX), removed when it fails."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path: str | os.PathLike, obj, **dump_kwargs) -> str:
  """`json.dump(obj)` to `path` atomically, newline-terminated; returns the path."""
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, **dump_kwargs)
    f.write("\n")
  return os.fspath(path)
