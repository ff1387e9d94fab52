"""A GRPO run compiles nothing after its first step but the programs of a padded capacity it had not met:
whatever its plans move (replicas in some micro-steps, none in others, bases of other sizes), every
step's tables have the run's shapes and layout (`TableSizes`) and run the programs compiled for the
first one (the soak's target: scripts/soak.py). Capacities follow the routed counts by design (each
bucket compiles once, `rl.capacity_buckets`)."""
import types

import numpy as np

import configs
from compile_count import count_compiles
from foremoe_jax.mesh import make_mesh
from foremoe_jax.model import Model
from foremoe_jax.rl.trainer import GRPOTrainer
from foremoe_jax.sft import make_task
from flax import nnx

STEPS = 6
# Tiny and quick: few capacities (buckets of powers of two, few tokens per (source, destination) pair), two
# micro-steps per mini-batch (first and last programs, refills between them), plans waited for (the same
# programs whatever the planner's timing).
SETTINGS = ["model.num_layers=1", "model.d_model=32", "model.d_ff_dense=32", "model.moe.d_ff_expert=16",
            f"rl.steps={STEPS}", "rl.prompts_per_step=16", "rl.group_size=4", "rl.rows_per_shard=2",
            "rl.tokens_per_shard=32", "rl.num_minibatches=2", "rl.capacity_buckets=1", "rl.recompute_layout=plan",
            "rl.plan_matmul_tflops=0.001"]  # compute-bound plans: balancing by replicas pays


def make_trainer(tmp_path, settings):
  cfg = configs.apply_overrides(configs.get_config("cpu_tiny"), settings).validate()
  mesh = make_mesh(cfg.mesh_data, cfg.mesh_expert)
  return GRPOTrainer(cfg, Model(cfg.model, mesh=mesh, rngs=nnx.Rngs(0)), mesh, make_task(cfg), str(tmp_path))


def test_base_rows_pad_the_base_less_and_grow_to_a_plan_that_needs_more(tmp_path):
  """rl.base_rows=0 sizes the base transfer for any base (S rows per device pair); a smaller value is
  raised, for the rest of the run, to the first base that needs more."""
  slots = configs.get_config("cpu_tiny").model.moe.slots_per_device
  assert make_trainer(tmp_path, SETTINGS).run_tables.sizes.base == slots
  trainer = make_trainer(tmp_path, [*SETTINGS, "rl.base_rows=1"])
  assert trainer.run_tables.sizes.base == 1
  home = np.array([[2 * d, 2 * d + 1, -1] for d in range(8)])
  base = home.copy()
  base[1, :2] = base[0, :2]  # device 0's two experts on device 1: two rows from 0 to 1
  trainer.run_tables.home = {2: "stale"}
  trainer.run_tables.fit_base(0, types.SimpleNamespace(base=np.stack([home, base])))
  assert trainer.run_tables.sizes.base == 2 and not trainer.run_tables.home
  trainer.run_tables.fit_base(1, types.SimpleNamespace(base=np.stack([home, home])))
  assert trainer.run_tables.sizes.base == 2
  # rl.table_sizes="plan" (the GPU presets'): each plan sizes its own tables, so nothing is fixed or raised
  trainer = make_trainer(tmp_path, [*SETTINGS, "rl.table_sizes=plan"])
  trainer.run_tables.fit_base(0, types.SimpleNamespace(base=np.stack([home, base])))
  assert trainer.run_tables.sizes is None


def test_a_grpo_run_compiles_nothing_after_its_first_step(tmp_path):
  trainer = make_trainer(tmp_path, SETTINGS)
  made, plan_tables = [], trainer.plan_tables

  def recording(step, work, i):
    tables = plan_tables(step, work, i)
    made.append((step, tables))
    return tables
  trainer.plan_tables = recording
  with count_compiles() as first:
    trainer.step(0)
  late = {}
  for step in range(1, STEPS):
    with count_compiles() as compiles:
      record = trainer.step(step)
    late[step] = (len(compiles), record["new_capacities"])
  # The run met what used to compile new programs: micro-steps that move replicas and ones that do not,
  # different bases.
  moved = [[bool(t.fill_M[m]) for m in range(t.num_micro_steps)] for _, t in made]
  assert {True, False} <= {f for row in moved for f in row}, moved
  assert len({tuple(t.home_L) for _, t in made}) > 1 or len({row for row in map(tuple, moved)}) > 1
  assert first and all(not compiles or capacities for compiles, capacities in late.values()), late
  assert sum(not capacities for _, capacities in late.values()) >= STEPS // 2, late  # most steps met none
