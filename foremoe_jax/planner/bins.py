"""Water-filling of a few bins in many problems at once: the block step of `split.waterfill_slot_loads`.

Bins run along axis 0 and problems along axis 1, so every op is one contiguous pass over the problems.
A block has few bins (one expert's copies): they are sorted by a sorting network of min/max ops, since
np.sort along a short axis pays a call per problem.
"""

from __future__ import annotations

import functools

import numpy as np

# Blocks with more bins than this sort with np.sort (a network's op count grows faster than its rows).
NETWORK_MAX_BINS = 8


@functools.lru_cache(maxsize=None)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
  """Comparators (i, j), i < j, of Batcher's odd-even merge sort on n inputs (those past n dropped)."""
  comparators = []
  p = 1
  while p < n:
    k = p
    while k >= 1:
      for j in range(k % p, n - k, 2 * k):
        for i in range(min(k, n - j - k)):
          if (i + j) // (2 * p) == (i + j + k) // (2 * p):
            comparators.append((i + j, i + j + k))
      k //= 2
    p *= 2
  return tuple(comparators)


def pour(others_RxN: np.ndarray, amount_N: np.ndarray) -> np.ndarray:
  """[R, N]: pours `amount` onto bins of heights `others` up to their lowest common level (a missing
  bin is one far taller than any level); the same floats as sorting, cumsum and the level of the last
  wet bin."""
  num_bins = others_RxN.shape[0]
  if num_bins > NETWORK_MAX_BINS:
    heights = list(np.sort(others_RxN, axis=0))
  else:
    heights = list(others_RxN)
    for i, j in sorting_network(num_bins):
      heights[i], heights[j] = np.minimum(heights[i], heights[j]), np.maximum(heights[i], heights[j])
  # Levels bin by bin, the sorted heights summed left to right (as cumsum).
  levels_RxN = np.empty(others_RxN.shape)
  wet = np.zeros(len(amount_N), np.int64)
  total = heights[0]
  for i, height in enumerate(heights):
    total = total + height if i else total
    np.divide(amount_N + total, i + 1, out=levels_RxN[i])
    wet += height < levels_RxN[i]
  level = levels_RxN[np.maximum(wet - 1, 0), np.arange(len(amount_N))]
  return np.maximum(level - others_RxN, 0.0)


def sums(x_RxN: np.ndarray) -> np.ndarray:
  """[N]: x summed over bins in the order np.sum adds a contiguous [N, R] array along R: left to right
  for fewer than 8 bins, numpy's pairwise order beyond."""
  if x_RxN.shape[0] >= 8:
    return np.ascontiguousarray(x_RxN.T).sum(1)
  total = x_RxN[0].copy()
  for row in x_RxN[1:]:
    total += row
  return total
