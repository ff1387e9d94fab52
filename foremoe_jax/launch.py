"""Runs a script as N local processes of one `jax.distributed` job, for trying multi-process on one box:

  python -m foremoe_jax.launch --processes 2 train.py --config cpu_tiny --run-dir runs/two

Each child gets JAX_COORDINATOR_ADDRESS (localhost, a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID,
and on CPU `--cpu-devices / N` virtual devices (XLA_FLAGS), so the global device count stays that of the
one-process run. Output lines are prefixed `[p<i>]`. When a child fails the others are terminated; the
exit status is the first failing child's (0 when all succeed).
"""
import argparse
import os
import socket
import subprocess
import sys
import threading
import time

from foremoe_jax.distributed import _SERIAL, CPU_DEVICES


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(rank: int, processes: int, port: int, cpu_devices: int, base=None) -> dict:
  """The environment of local process `rank`."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
             JAX_PROCESS_ID=str(rank), PYTHONUNBUFFERED="1")
  if env.get("JAX_PLATFORMS", "") in ("", "cpu"):
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    if _SERIAL not in flags:
      flags += f" {_SERIAL}"
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices // processes}".strip()
  return env


def _relay(stream, prefix: str) -> None:
  for line in iter(stream.readline, b""):
    sys.stdout.write(prefix + line.decode(errors="replace"))
    sys.stdout.flush()


def launch(cmd: list[str], processes: int, *, cpu_devices: int = CPU_DEVICES, port: int | None = None,
           timeout: float | None = None) -> int:
  """Starts `cmd` `processes` times and waits; returns the exit status (124 on timeout)."""
  if processes < 1:
    raise ValueError(f"--processes must be >= 1, got {processes}")
  if cpu_devices % processes:
    raise ValueError(f"--cpu-devices={cpu_devices} does not split evenly over {processes} processes")
  port = port or free_port()
  children, relays = [], []
  for rank in range(processes):
    child = subprocess.Popen(cmd, env=child_env(rank, processes, port, cpu_devices), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    children.append(child)
    relays.append(threading.Thread(target=_relay, args=(child.stdout, f"[p{rank}] "), daemon=True))
    relays[-1].start()
  deadline = None if timeout is None else time.monotonic() + timeout
  status = 0
  try:
    while None in (codes := [c.poll() for c in children]):  # poll every child: any may fail first
      failed = [code for code in codes if code not in (None, 0)]
      if failed or (deadline is not None and time.monotonic() > deadline):
        status = failed[0] if failed else 124
        break
      time.sleep(0.1)
    else:
      status = next((code for code in codes if code), 0)
  finally:
    for c in children:  # one failed (its peers would wait for it forever), timed out, or interrupted
      if c.poll() is None:
        c.terminate()
    for c in children:
      try:
        c.wait(timeout=10)
      except subprocess.TimeoutExpired:
        c.kill()
        c.wait()
    for r in relays:
      r.join(timeout=5)
  return status


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--processes", type=int, required=True, help="local processes to start")
  p.add_argument("--cpu-devices", type=int, default=CPU_DEVICES,
                 help="global virtual CPU devices, split evenly over the processes (CPU only)")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  p.add_argument("--timeout", type=float, default=None, help="seconds before all processes are terminated")
  p.add_argument("script", help="a Python script, e.g. train.py")
  p.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
  a = p.parse_args(argv)
  return launch([sys.executable, a.script, *a.args], a.processes, cpu_devices=a.cpu_devices, port=a.port,
                timeout=a.timeout)


if __name__ == "__main__":
  sys.exit(main())
