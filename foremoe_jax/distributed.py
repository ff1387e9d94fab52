"""Process setup for one- and multi-process runs on `jax.distributed`, and the checks that keep processes
in step.

Launches understood (the first that applies):
- explicit env: `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` on every process
  (what `python -m foremoe_jax.launch` sets for local processes);
- SLURM (`srun`, `SLURM_NTASKS > 1`) or Open MPI (`mpirun`, `OMPI_COMM_WORLD_SIZE > 1`): jax detects the
  coordinator, process count and id by itself;
- otherwise one process, no coordinator.
Mesh sizes in presets are global: `mesh_data x mesh_expert` must equal processes x local devices.
CPU runs get `FOREMOE_CPU_DEVICES` (default 8) virtual devices in total, split evenly over the processes,
and exchange collectives over gloo.
"""
import hashlib
import logging
import os

import numpy as np

log = logging.getLogger(__name__)

CPU_DEVICES = 8  # global virtual CPU devices of the CPU presets (FOREMOE_CPU_DEVICES overrides)
_SERIAL = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def env_num_processes(env=None) -> int:
  """Processes of this launch as the environment tells it (before jax starts)."""
  env = os.environ if env is None else env
  for key in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(key):
      return int(env[key])
  return 1


def setup_cpu_devices(env=None) -> None:
  """Sets XLA_FLAGS for `FOREMOE_CPU_DEVICES / processes` virtual CPU devices per process, unless an
  accelerator platform is requested or the flags already name a count. Must run before jax is imported."""
  env = os.environ if env is None else env
  flags = env.get("XLA_FLAGS", "")
  if env.get("JAX_PLATFORMS", "") not in ("", "cpu") or "xla_force_host_platform_device_count" in flags:
    return
  total, processes = int(env.get("FOREMOE_CPU_DEVICES", CPU_DEVICES)), env_num_processes(env)
  if total % processes:
    raise ValueError(f"FOREMOE_CPU_DEVICES={total} virtual CPU devices do not split evenly over {processes} "
                     "processes")
  # Serial collectives: concurrently scheduled ones can deadlock with more devices than cores.
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={total // processes} {_SERIAL}".strip()


def initialize(jax, env=None) -> str:
  """Starts `jax.distributed` when the launch has several processes; returns how it was launched
  ("single", "env", "slurm" or "mpi"). CPU collectives go over gloo (jax's default since 0.5; set here so
  that a config elsewhere cannot leave cross-process CPU collectives unimplemented)."""
  env = os.environ if env is None else env
  if env.get("JAX_PLATFORMS", "") in ("", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    if "JAX_PROCESS_ID" not in env:
      raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not: set it "
                       "to this process's index in [0, JAX_NUM_PROCESSES) on every process")
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
    how = "env"
  elif int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
    how = "slurm"
  elif int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
    how = "mpi"
  else:
    return "single"
  log.info("process %d (%s launch): %s", jax.process_index(), how, describe_devices(jax))
  return how


def is_writer() -> bool:
  """Process 0 writes metrics, TensorBoard, plots, summary.json and exported weights; checkpoints are
  written by all processes together (Orbax)."""
  import jax  # noqa: PLC0415  (this module is imported before jax's XLA flags are set)
  return jax.process_index() == 0


def describe_devices(jax) -> str:
  """`2 processes x 4 local devices (cpu)`: how the global device count comes about."""
  return (f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''} x "
          f"{jax.local_device_count()} local devices ({jax.devices()[0].platform})")


def to_host(tree):
  """A pytree of global arrays as numpy on every process. Multi-process: the leaves no process holds whole
  are all-gathered in one call (every process must call it), e.g. a rollout's routes, gathered once per
  step so that every process plans from the same counts."""
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  leaves, treedef = jax.tree.flatten(tree)
  remote = [i for i, x in enumerate(leaves) if not x.is_fully_addressable]
  out = [None if i in remote else np.asarray(x) for i, x in enumerate(leaves)]
  if remote:
    gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
    for i, x in zip(remote, gathered):
      out[i] = np.asarray(x)
  return jax.tree.unflatten(treedef, out)


def digest(arrays) -> np.ndarray:
  """sha256 of the arrays' dtypes, shapes and bytes as 8 uint32 (cheap to compare across processes)."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return np.frombuffer(h.digest(), np.uint32).copy()


def check_same_across_processes(arrays, what: str) -> str:
  """Raises RuntimeError when the arrays differ between processes (compared by hash; one small all-gather).
  Every process must call it at the same point. Returns the hex digest (comparable across runs); a single
  process only hashes."""
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  mine = digest(arrays)
  if jax.process_count() == 1:
    return mine.tobytes().hex()
  every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 8]
  differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
  if differ:
    raise RuntimeError(f"{what} differs between processes: processes {differ} disagree with process 0 "
                       f"(this is process {jax.process_index()}); every process must compute the same "
                       "result from the same gathered inputs")
  return mine.tobytes().hex()


def true_on_every_process(flag: bool) -> bool:
  """`flag` and'ed over the processes (one tiny all-gather; a single process returns it as it is): for a
  choice that depends on local timing, e.g. whether a plan is ready, that every process must make alike.
  Every process must call it at the same point."""
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))).min())


def gather_over_processes(arrays) -> list[np.ndarray]:
  """Each array stacked over the processes, `[processes, ...]` in process order (one all-gather; a single
  process only adds the axis). Every process must call it at the same point, with arrays of the same
  shapes and dtypes: e.g. the counts each host's rows send, summed into the step's planning input."""
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  arrays = [np.asarray(a) for a in arrays]
  if jax.process_count() == 1:
    return [a[None] for a in arrays]
  if not jax.config.jax_enable_x64:  # the all-gather would narrow 64-bit values to 32 bits
    wide = [a for a in arrays if a.dtype.kind in "iu" and a.dtype.itemsize == 8 and a.size and np.abs(a).max() >= 2**31]
    if wide:
      raise ValueError(f"gather_over_processes: values up to {np.abs(wide[0]).max()} do not fit the 32 bits "
                       "jax gathers without jax_enable_x64")
  return [np.asarray(x).astype(a.dtype) for x, a in zip(multihost_utils.process_allgather(arrays), arrays)]


def max_over_processes(value: int) -> int:
  """The largest of every process's `value` (one tiny all-gather; a single process returns it): a size
  that every process must use alike, e.g. the micro-steps of a step or a batch's padded width."""
  return int(gather_over_processes([np.asarray(value, np.int64)])[0].max())
