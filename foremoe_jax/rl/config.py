"""RL (GRPO) settings; the `rl` section of a train.py preset."""
import dataclasses
import os

from foremoe_jax.planner import POLICIES
from foremoe_jax.planner.pairs import BUCKETS_PER_OCTAVE, check_buckets

RECOMPUTE_LAYOUTS = ("ready", "plan", "home")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  steps: int = 6  # rollouts; each is followed by recompute and num_minibatches x ppo_epochs updates
  prompts_per_step: int = 32
  group_size: int = 4  # samples per prompt (GRPO group)
  max_new_tokens: int = 5
  temperature: float = 1.0
  top_p: float = 1.0
  rows_per_shard: int = 4  # rows per device per micro-step (one sequence each, or several packed)
  tokens_per_shard: int = 64  # real-token budget per device per micro-step
  # Pack several sequences back to back into each row (veRL / slime "remove padding", fixed shapes):
  # attention masked per sequence, padding routed nowhere. Off: one sequence per row, right-padded.
  pack_sequences: bool = False
  # Packing groups: each packs its contiguous block of the batch rows into its block of the batch shards
  # (rl/host_batches.py), so every process packs only the rows it built. 0: one group per process; else a
  # multiple of the processes dividing the batch shards. The packing, hence every number of a step,
  # depends on it: a 1-process run equals a P-process run only with the same groups (rl.pack_groups=P).
  pack_groups: int = 0
  num_minibatches: int = 2  # optimizer steps per epoch over the rollout
  ppo_epochs: int = 1
  clip_eps: float = 0.2
  kl_coef: float = 0.0  # > 0: KL to the SFT policy (k3 estimator)
  lr: float = 3e-4
  # Adam's moments (and its update arithmetic): float32 even for bf16 weights, or bfloat16 where float32
  # does not fit (the README's memory table: Qwen3-30B-A3B at EP 8 on an H100).
  adam_dtype: str = "float32"
  policy: str = "foremoe"  # placement policy of the recompute and update stages
  # The layout each mini-batch's recompute runs in (any gives the same log-probs: routes are replayed):
  # "ready": its plan's if that plan is ready when the recompute is dispatched or the home layout would
  # compile a program, else the home layout (no wait; every process makes the same choice); "plan":
  # always its plan's (waits for it); "home": always
  # the home layout. "plan" and "home" are deterministic: runs compared bit for bit need one of them.
  recompute_layout: str = "ready"
  # Also plan every policy on each step's counts for the report (imbalance, load): that re-planning runs on
  # the planner's worker beside the dispatch loop and, in a thread, takes the GIL from it. Off: the
  # running policy (from its own plans) and static (the home layout) only.
  report_policies: bool = False
  # Plan in a spawned process instead of a thread: the planner's many small numpy calls take the GIL, and
  # beside the loop that dispatches the recompute a thread ran them slower on the CI box. Off by
  # default until it is timed on a GPU (BENCHMARKS.md, RL step; numbers behind choices).
  plan_in_process: bool = False
  # The planner's cost model (per device; the expert's shape comes from the model). Defaults: one H100
  # of an NVLink node. A move pays only where it saves ~bytes*flops/(3*link) pairs on the busiest device.
  plan_matmul_tflops: float = 400.0  # grouped GEMM rate
  plan_link_gbs: float = 290.0  # ppermute bandwidth
  plan_a2a_gbs: float = 500.0  # all_to_all bandwidth
  # Padded all_to_all capacities per power of two (PlanConfig.capacity_buckets): each capacity a
  # micro-step meets compiles its recompute and update programs; fewer buckets, fewer compiles, more rows.
  capacity_buckets: int = BUCKETS_PER_OCTAVE
  # A new capacity's programs compile before the stage that runs them, this many at a time (XLA compiles
  # in threads; 0: each compiles when first called, one after another): the first step of new capacities
  # waits less (BENCHMARKS.md, compile time).
  compile_workers: int = 8
  # Rows per (source, destination) pair of the base transfer, fixed for the run like every table's
  # (`step_tables.TableSizes`); 0: S, which no base exceeds, so no plan ever compiles new programs. Fewer
  # pad the base's all_to_all less (each row is an expert); a plan that needs more raises it to the need's
  # power of two for the rest of the run (logged; its programs compile then).
  base_rows: int = 0
  # "fixed": the move tables' row counts and layout above, fixed for the run (nothing compiles after the
  # first steps; micro-steps that move nothing still run empty transfer collectives). "plan": each plan's
  # own power-of-two sizes and program variants (fewer rows shipped; a variant compiles the first time a
  # plan needs it). The GPU presets use "plan" until the fixed sizes' padded transfers are measured there.
  table_sizes: str = "fixed"
  prompt_file: str = ""  # "prompt<TAB>answer" lines; empty: arithmetic problems drawn on the fly
  ckpt_every: int = 1

  def validate(self, num_shards: int) -> "RLConfig":
    if self.policy not in POLICIES:
      raise ValueError(f"rl.policy={self.policy!r} is not one of {POLICIES}")
    if self.recompute_layout not in RECOMPUTE_LAYOUTS:
      raise ValueError(f"rl.recompute_layout={self.recompute_layout!r} is not one of {RECOMPUTE_LAYOUTS}")
    if self.adam_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"rl.adam_dtype={self.adam_dtype!r} must be 'float32' or 'bfloat16'")
    if self.pack_groups < 0:
      raise ValueError(f"rl.pack_groups={self.pack_groups} must be >= 0 (0: one packing group per process)")
    if self.table_sizes not in ("fixed", "plan"):
      raise ValueError(f"rl.table_sizes={self.table_sizes!r} must be 'fixed' or 'plan'")
    if self.base_rows < 0:
      raise ValueError(f"rl.base_rows={self.base_rows} must be >= 0 (0: the slots per device, no base needs more)")
    if self.compile_workers < 0:
      raise ValueError(f"rl.compile_workers={self.compile_workers} must be >= 0 (0: compile when first called)")
    positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "rows_per_shard",
                "tokens_per_shard", "num_minibatches", "ppo_epochs")
    bad = [f"rl.{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
    if bad:
      raise ValueError(f"must be >= 1: {', '.join(bad)}")
    if (self.prompts_per_step * self.group_size) % num_shards:
      raise ValueError(f"rl.prompts_per_step * rl.group_size = {self.prompts_per_step * self.group_size} is "
                       f"not divisible by the {num_shards} devices of the batch axes")
    check_buckets(self.capacity_buckets, "rl.capacity_buckets")
    if min(self.plan_matmul_tflops, self.plan_link_gbs, self.plan_a2a_gbs) <= 0:
      raise ValueError("rl.plan_matmul_tflops, rl.plan_link_gbs and rl.plan_a2a_gbs must be > 0")
    if not 0 < self.top_p <= 1 or self.temperature < 0 or self.clip_eps <= 0 or self.kl_coef < 0 or self.lr <= 0:
      raise ValueError("need 0 < rl.top_p <= 1, rl.temperature >= 0, rl.clip_eps > 0, rl.kl_coef >= 0, rl.lr > 0")
    if self.prompt_file and not os.path.isfile(self.prompt_file):
      raise FileNotFoundError(f"rl.prompt_file {self.prompt_file!r} does not exist")
    return self
