"""Atomic writes: a failed or killed write never leaves a half file under the real name."""
import json
import os
import stat

import pytest

from foremoe_jax.atomic import atomic_path, write_json


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
  target = tmp_path / "sub" / "summary.json"
  write_json(target, {"v": 1})
  assert json.loads(target.read_text()) == {"v": 1}
  assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~_umask()
  with pytest.raises(RuntimeError, match="killed"):
    with atomic_path(target) as tmp, open(tmp, "w") as f:
      f.write('{"v": 2, "half')
      raise RuntimeError("killed mid-write")
  assert json.loads(target.read_text()) == {"v": 1}
  assert os.listdir(target.parent) == ["summary.json"]  # no temporary left behind


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask
