"""benchmarks/gmm_plan_groups.py reports the kernel's own tile count (tiling.row_tiles)."""
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from pallas_kernels import tiling

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gmm_plan_groups  # noqa: E402


def test_tile_visits_match_the_kernels_row_tiles():
  rng = np.random.default_rng(4)
  sizes_BxS = rng.integers(0, 700, (6, 9))
  sizes_BxS[:, 2] = 0  # empty groups cost nothing
  m = int(-(-sizes_BxS.sum(-1).max() // 128) * 128)
  per_set = []
  for sizes in sizes_BxS:
    t = tiling.row_tiles(jnp.asarray(sizes), m, 128)
    real = (np.asarray(t.group) < len(sizes)) & (np.asarray(t.size) > 0)
    per_set.append(real.sum())
  assert gmm_plan_groups.tile_visits(sizes_BxS) == np.mean(per_set)
