"""A GRPO run compiles nothing after its first step: whatever its plans move (replicas in some micro-steps,
none in others, bases of other sizes), every step's tables have the run's shapes (`TableSizes`) and run
the programs compiled for the first one (the soak's target: scripts/soak.py)."""
import configs
from compile_count import count_compiles
from foremoe_jax.mesh import make_mesh
from foremoe_jax.model import Model
from foremoe_jax.rl.trainer import GRPOTrainer
from foremoe_jax.sft import make_task
from flax import nnx

STEPS = 6
# Tiny and quick: one capacity (buckets of powers of two, few tokens per (source, destination) pair), two
# micro-steps per mini-batch (first and last programs, refills between them), plans waited for (the same
# programs whatever the planner's timing).
SETTINGS = ["model.num_layers=1", "model.d_model=32", "model.d_ff_dense=32", "model.d_ff_expert=16",
            f"rl.steps={STEPS}", "rl.prompts_per_step=16", "rl.group_size=4", "rl.rows_per_shard=2",
            "rl.tokens_per_shard=32", "rl.num_minibatches=2", "rl.capacity_buckets=1", "rl.recompute_layout=plan"]


def test_a_grpo_run_compiles_nothing_after_its_first_step(tmp_path):
  cfg = configs.apply_overrides(configs.get_config("cpu_tiny"), SETTINGS).validate()
  mesh = make_mesh(cfg.mesh_data, cfg.mesh_expert)
  trainer = GRPOTrainer(cfg, Model(cfg.model, mesh=mesh, rngs=nnx.Rngs(0)), mesh, make_task(cfg), str(tmp_path))
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
  assert first and late == {step: (0, []) for step in range(1, STEPS)}, late
