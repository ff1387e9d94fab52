"""Planner configuration and the cost model that decides when a per-micro-step slot move pays off."""

from __future__ import annotations

import dataclasses

import numpy as np

from foremoe_jax.planner.pairs import BUCKETS_PER_OCTAVE, check_buckets

POLICIES = ("static", "eplb_step", "eplb_history", "eplb_microstep", "foremoe")


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Seconds per token, per expert move and per all-to-all byte on one device.

  Defaults: one H100 of an NVLink node (numbers measured in ../shared/DESIGN.md §5) running a
  Qwen3-30B-A3B-shaped expert (hidden 2048, SwiGLU intermediate 768, bf16: 9.4 MB per expert).
  A benchmark calibrates it by passing measured rates (`benchmarks/planner.py --flops ... --link ...`).
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
  # True: the token all-to-all pads every (source, destination) pair to one capacity per micro-step
  # (the executor's padded dispatch), so each micro-step pays, in every layer, its layers' largest pair
  # count, bucketed. False: it moves only the rows that exist (a ragged exchange): each (m, l) pays its
  # busiest receiver.
  padded_a2a: bool = True

  @property
  def expert_bytes(self) -> float:
    return 3.0 * self.hidden * self.expert_intermediate * self.bytes_per_param

  @property
  def token_compute_s(self) -> float:
    """One (token, expert) pair through a SwiGLU expert, forward (2*3*h*f FLOPs) plus backward (2x)."""
    return 3 * 2 * 3 * self.hidden * self.expert_intermediate / self.matmul_flops_per_s

  @property
  def move_s(self) -> float:
    """One slot refill: weights in before the micro-step, gradients back to the base after it."""
    return 2.0 * self.expert_bytes / self.link_bytes_per_s

  @property
  def base_move_s(self) -> float:
    """One base slot fetched from another device: its weights in when the step begins, and at its end
    its gradient, summed over the micro-steps in (at least) float32, back home."""
    grad_bytes = max(self.bytes_per_param, 4) / self.bytes_per_param * self.expert_bytes
    return (self.expert_bytes + grad_bytes) / self.link_bytes_per_s

  @property
  def a2a_s_per_token(self) -> float:
    """A pair leaving its source device: dispatch and combine, forward and backward (4 hidden vectors)."""
    return 4.0 * self.hidden * self.bytes_per_param / self.a2a_bytes_per_s

  def a2a_s(self, rows):
    """An all-to-all in which every device ships (and receives) this many rows: a padded one ships D
    times its capacity, a ragged one about the busiest receiver's load. Elementwise on arrays."""
    return rows * self.a2a_s_per_token

  def layer_s(self, max_load, max_moves_per_device, max_remote_tokens=0.0):
    """Estimated time of one (m, l): slowest device's compute, plus exposed transfer and dispatch time.

    Works elementwise on arrays: max_load and max_remote_tokens in tokens, moves in slots.
    """
    compute = max_load * self.token_compute_s
    transfer = max_moves_per_device * self.move_s
    exposed = np.maximum(transfer - self.overlap_fraction * compute, 0.0)
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
    if self.num_experts % self.num_devices:
      raise ValueError(
          f"num_experts={self.num_experts} is not divisible by num_devices={self.num_devices}")
    if self.num_slots < self.num_experts:
      raise ValueError(
          f"num_devices*slots_per_device={self.num_slots} < num_experts={self.num_experts}: "
          "some expert would have no slot")
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
