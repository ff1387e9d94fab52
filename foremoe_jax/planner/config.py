"""Planner configuration and the cost model that decides when a per-micro-step slot move pays off."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from foremoe_jax.planner.pairs import BUCKETS_PER_OCTAVE, check_buckets
from foremoe_jax.planner.slots import check_layout

POLICIES = ("static", "eplb_step", "eplb_history", "eplb_microstep", "foremoe")
# The pricing rule of each token exchange, by its name in `foremoe_jax.backends.DISPATCH` (a test keeps the
# names equal). "capacity": every (source, destination) pair is padded to one capacity per micro-step (the
# executor's rule), so each micro-step pays, in every layer, its layers' largest pair count, bucketed.
# "rows": only the rows that exist move, so each (m, l) pays its busiest receiver.
DISPATCH_COSTS = {"padded": "capacity", "ragged": "rows"}
# Measured exposed transfer costs per card (`benchmarks/overlap.py --calibrate` writes them).
CALIBRATION_DIR = pathlib.Path(__file__).parent / "calibration"
# The card whose calibration the planner's default cost model loads: the NVLink cost measured on
# 4 x H200 (BENCHMARKS.md); no host-path measurement is committed yet.
DEFAULT_CARD = "h200x4"


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Seconds per token, per expert move and per all-to-all byte on one device.

  Defaults: one H100 of an NVLink node (numbers measured in ../shared/DESIGN.md §5) running a
  Qwen3-30B-A3B-shaped expert (hidden 2048, SwiGLU intermediate 768, bf16: 9.4 MB per expert).
  A benchmark calibrates it by passing measured rates (`benchmarks/planner.py --flops ... --link ...`).

  Moves are priced per tenure: the micro-steps a slot keeps one replica. The executor fetches it once
  and sends its gradient back once, when the tenure ends: a tenure of one micro-step straight from that
  micro-step's gradient, in the weights' dtype (`direct_return_s`); a longer one as the sum it held in a
  float32 accumulator row (`held_return_s`). So a one-micro-step tenure costs `direct_move_s`, a longer
  one `move_s` (bf16 weights: 2 and 3 expert-sized transfers). A tenure's fetch takes one of two paths:
  "link" (from another device's base slot over NVLink) or "host" (from the pinned-host copy over the
  device's own host link, `foremoe_jax.host_transfer`); its gradient goes back over the link either way.
  The two links run concurrently, so a device's refills split between them (`host_moves`).
  `link_exposed_s` / `host_exposed_s` are the measured exposed seconds per moved expert-layer (what a
  refill adds to a micro-step after overlapping its compute, not its isolated time); `CostModel.calibrated()`
  loads them. The link's was measured on one-micro-step tenures (weights in, gradient back in bf16); a
  longer tenure's is scaled by its bytes (`link_exposed_s * move_s / direct_move_s`). None: the link is
  estimated from `link_bytes_per_s` and `overlap_fraction`, and there is no host path.
  """

  hidden: int = 2048
  expert_intermediate: int = 768
  bytes_per_param: int = 2
  matmul_flops_per_s: float = 400e12  # grouped bf16 GEMM, fwd and bwd alike
  link_bytes_per_s: float = 290e9  # lax.ppermute per device
  a2a_bytes_per_s: float = 500e9  # all_to_all per device
  # Share of an (m, l)'s expert compute during which the link is free to prefetch its replicas;
  # transfer time beyond it is exposed and counted as cost. 0: on 4 x H200 a prefetched refill hid
  # nothing (BENCHMARKS.md), and the executor refills right before each micro-step by default.
  overlap_fraction: float = 0.0
  # The token exchange by its backend's name (`foremoe_jax.backends.DISPATCH`), priced per DISPATCH_COSTS.
  dispatch: str = "padded"
  link_exposed_s: float | None = None
  host_exposed_s: float | None = None
  calibration: str = ""  # where the measured costs come from (card, file)

  def __post_init__(self):
    if self.dispatch not in DISPATCH_COSTS:
      raise ValueError(f"CostModel.dispatch={self.dispatch!r}: the planner prices {tuple(DISPATCH_COSTS)}")
    for name in ("link_exposed_s", "host_exposed_s"):
      value = getattr(self, name)
      if value is not None and not (np.isfinite(value) and value >= 0):
        raise ValueError(f"CostModel.{name} must be None or a finite number >= 0, got {value!r}")

  @classmethod
  def calibrated(cls, card: str = DEFAULT_CARD, path: str | pathlib.Path | None = None, **fields) -> CostModel:
    """The cost model with the measured exposed costs of `card` (a file in CALIBRATION_DIR, or `path`),
    scaled by expert size where `fields` change the expert's shape or dtype (costs ~ bytes moved)."""
    path = pathlib.Path(path) if path is not None else CALIBRATION_DIR / f"{card}.json"
    if not path.exists():
      raise ValueError(f"no calibration for card {card!r} at {path}: run benchmarks/overlap.py --calibrate there")
    cal = json.loads(path.read_text())
    model = cls(**fields)
    shape = cal["shapes"]
    scale = model.expert_bytes / (3.0 * shape["hidden"] * shape["expert"] * 2)  # calibrated in bf16
    host_ms = cal.get("host_exposed_ms")  # None: no host path measured on this card
    return dataclasses.replace(model, link_exposed_s=cal["link_exposed_ms"] * 1e-3 * scale,
                               host_exposed_s=None if host_ms is None else host_ms * 1e-3 * scale,
                               calibration=f"{cal['card']} ({cal['device']}, JAX {cal['jax']}): {path.name}")

  @property
  def padded_a2a(self) -> bool:
    """Whether each micro-step's exchange pads every pair to one capacity (see DISPATCH_COSTS)."""
    return DISPATCH_COSTS[self.dispatch] == "capacity"

  @property
  def expert_bytes(self) -> float:
    return 3.0 * self.hidden * self.expert_intermediate * self.bytes_per_param

  @property
  def token_compute_s(self) -> float:
    """One (token, expert) pair through a SwiGLU expert, forward (2*3*h*f FLOPs) plus backward (2x)."""
    return 3 * 2 * 3 * self.hidden * self.expert_intermediate / self.matmul_flops_per_s

  @property
  def fetch_s(self) -> float:
    """A replica's weights in over the link, by bandwidth."""
    return self.expert_bytes / self.link_bytes_per_s

  @property
  def direct_return_s(self) -> float:
    """A one-micro-step tenure's gradient back over the link: sent at once, in the weights' dtype."""
    return self.expert_bytes / self.link_bytes_per_s

  @property
  def held_return_s(self) -> float:
    """A longer tenure's (or a base slot's) gradient back over the link: its float32 accumulator row
    (at least float32: wider weights accumulate in their own dtype), by bandwidth."""
    return max(self.bytes_per_param, 4) / self.bytes_per_param * self.expert_bytes / self.link_bytes_per_s

  @property
  def direct_move_s(self) -> float:
    """A tenure of one micro-step: its weights in, its gradient back in the weights' dtype."""
    return self.fetch_s + self.direct_return_s

  @property
  def move_s(self) -> float:
    """A tenure of two micro-steps or more: its weights in when it starts, and when it ends its gradient,
    summed over the tenure's micro-steps in float32, back to the base, once."""
    return self.fetch_s + self.held_return_s

  @property
  def base_move_s(self) -> float:
    """One base slot fetched from another device: its weights in when the step begins, and at its end
    its gradient, summed over the micro-steps in float32, back home: a tenure of the step (held even
    when the step has one micro-step: the base's gradients always start a float32 accumulator)."""
    return self.move_s

  @property
  def a2a_s_per_token(self) -> float:
    """A pair leaving its source device: dispatch and combine, forward and backward (4 hidden vectors)."""
    return 4.0 * self.hidden * self.bytes_per_param / self.a2a_bytes_per_s

  def a2a_s(self, rows):
    """An all-to-all in which every device ships (and receives) this many rows: a padded one ships D
    times its capacity, a ragged one about the busiest receiver's load. Elementwise on arrays."""
    return rows * self.a2a_s_per_token

  def _link_units(self) -> tuple[float, float]:
    """Link seconds of a one-micro-step and of a longer tenure, before any overlap with compute."""
    if self.link_exposed_s is None:
      return self.direct_move_s, self.move_s
    return self.link_exposed_s, self.link_exposed_s * self.move_s / self.direct_move_s

  def _exposed(self, link_s, compute_s):
    """Link seconds less the share of the compute they overlap (measured costs are exposed already)."""
    if self.link_exposed_s is not None:
      return link_s
    return np.maximum(link_s - self.overlap_fraction * np.asarray(compute_s), 0.0)

  def _link_s(self, short, long, compute_s):
    """Exposed seconds of `short` one-micro-step and `long` longer tenures fetched over the link."""
    per_short, per_long = self._link_units()
    return self._exposed(short * per_short + long * per_long, compute_s)

  def _split_s(self, short, long, compute_s):
    """[Hs+1, Hl+1, ...]: exposed seconds of a device's new tenures (`short` of one micro-step, `long`
    of more) with hs of the short and hl of the long fetched over the host path (inf where more than
    there are); the paths run concurrently, the host fetches' gradients use the link."""
    short, long = np.broadcast_arrays(np.asarray(short, np.float64), np.asarray(long, np.float64))
    most_short, most_long = (int(a.max(initial=0)) for a in (short, long))
    hs = np.arange(most_short + 1, dtype=np.float64).reshape(-1, 1, *[1] * short.ndim)
    hl = np.arange(most_long + 1, dtype=np.float64).reshape(1, -1, *[1] * short.ndim)
    link_s = self._link_s(short - hs, long - hl, compute_s) + hs * self.direct_return_s + hl * self.held_return_s
    return np.where((hs <= short) & (hl <= long), np.maximum((hs + hl) * self.host_exposed_s, link_s), np.inf)

  def moves_s(self, short, long, compute_s=0.0):
    """Exposed seconds of a device's new tenures, `short` of one micro-step and `long` of more, at the
    best split between the paths. Elementwise on arrays; compute_s (the (m, l)'s compute) matters only
    to the estimated link."""
    if self.host_exposed_s is None:
      return self._link_s(np.asarray(short, np.float64), np.asarray(long, np.float64), compute_s)
    return self._split_s(short, long, compute_s).min((0, 1))

  def host_moves(self, short, long, compute_s=0.0):
    """(int64, int64), elementwise: how many of the `short` and of the `long` tenures the best split
    fetches over the host path."""
    if self.host_exposed_s is None:
      zeros = np.zeros(np.broadcast_shapes(np.shape(short), np.shape(long)), np.int64)
      return zeros, zeros
    split_s = self._split_s(short, long, compute_s)
    best = split_s.reshape(-1, *split_s.shape[2:]).argmin(0)
    return np.divmod(best, split_s.shape[1])

  def layer_s(self, max_load, short_xD=0, long_xD=0, max_remote_tokens=0.0):
    """Estimated time of one (m, l): slowest device's compute, plus exposed transfer and dispatch time.

    Works elementwise on arrays: max_load and max_remote_tokens in tokens; short / long: per device (the
    last axis) the tenures that start in this (m, l), of one micro-step / of more (`tenures.new_tenures`),
    each priced with its fetch and its one gradient return; the busiest device's transfers count.
    """
    compute = max_load * self.token_compute_s
    short_xD, long_xD = (np.atleast_1d(a) for a in (short_xD, long_xD))
    exposed = self.moves_s(short_xD, long_xD, np.asarray(compute)[..., None]).max(-1)
    return compute + exposed + max_remote_tokens * self.a2a_s_per_token


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """What to plan for. E experts, D devices, S slots per device (S = E/D + redundant slots)."""

  num_experts: int
  num_devices: int
  slots_per_device: int
  policy: str = "foremoe"
  # foremoe: slots per device per (m, l) that may differ from the step's base placement.
  max_moves_per_device: int = 1
  # foremoe: block-coordinate sweeps of the water-filling split (each sweep visits every replicated expert).
  split_sweeps: int = 4
  # foremoe: sweeps of the pair-aware split (flattens (source, destination) pair counts; 0 = local first).
  pair_sweeps: int = 1
  # foremoe: also try the EPLB step placement as the base, per layer (keeps foremoe <= eplb_step).
  eplb_base_candidate: bool = True
  # EPLB policies (and foremoe's EPLB base): hierarchical mode with these expert groups and nodes.
  eplb_groups: int = 1
  eplb_nodes: int = 1
  # Padded capacities per power of two (a power of two): more pad less, fewer compile fewer programs
  # (each capacity a micro-step meets compiles its forward and gradient programs once).
  capacity_buckets: int = BUCKETS_PER_OCTAVE
  cost: CostModel = dataclasses.field(default_factory=CostModel)

  def __post_init__(self):
    for name in ("num_experts", "num_devices", "slots_per_device"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PlanConfig.{name} must be a positive int, got {value!r}")
    check_layout(self.num_experts, self.num_devices, self.slots_per_device)
    if self.policy not in POLICIES:
      raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
    if min(self.max_moves_per_device, self.split_sweeps, self.pair_sweeps) < 0:
      raise ValueError("max_moves_per_device, split_sweeps and pair_sweeps must be >= 0")
    if self.eplb_groups < 1 or self.eplb_nodes < 1:
      raise ValueError("eplb_groups and eplb_nodes must be >= 1")
    check_buckets(self.capacity_buckets, "PlanConfig.capacity_buckets")

  @property
  def experts_per_device(self) -> int:
    return self.num_experts // self.num_devices

  @property
  def redundant_per_device(self) -> int:
    return self.slots_per_device - self.experts_per_device

  @property
  def num_slots(self) -> int:
    return self.num_devices * self.slots_per_device
