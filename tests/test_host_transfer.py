"""Host-assisted transfer path: fetches from a pinned-host copy match the plain gather on values and
gradients (the fetched replicas' gradients go to the home weights), with traced rows (no recompiles)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foremoe_jax.host_transfer import MECHANISMS, host_copy, host_fetch, host_tables
from moe_reference import cpu_mesh

E, D, S, X = 16, 8, 3, 5


def random_targets(rng, per_device):
  """(device, slot, expert) fetches: `per_device` distinct slots per device, random experts."""
  return [(d, int(j), int(rng.integers(E))) for d in range(D) for j in rng.choice(S, per_device, replace=False)]


def plain(home, dst, targets):
  """Reference: the plain gather home[expert] written into the working rows d*S + slot."""
  rows = np.array([d * S + j for d, j, _ in targets])
  experts = np.array([e for _, _, e in targets])
  return jax.tree.map(lambda h, t: t.at[rows].set(h[experts]), home, dst)


@pytest.fixture(scope="module")
def setup():
  mesh = cpu_mesh(1, D)
  key_h, key_d, key_c = jax.random.split(jax.random.key(0), 3)
  home = {"w": jax.random.normal(key_h, (E, X, 2)), "v": jax.random.normal(key_h, (E, X))}
  dst = {"w": jax.random.normal(key_d, (D * S, X, 2)), "v": jax.random.normal(key_d, (D * S, X))}
  cot = {"w": jax.random.normal(key_c, (D * S, X, 2)), "v": jax.random.normal(key_c, (D * S, X))}
  return mesh, home, dst, cot


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_host_fetch_matches_plain_gather(setup, mechanism, caplog):
  mesh, home, dst, cot = setup
  with caplog.at_level("WARNING", logger="foremoe_jax"):
    host = host_copy(home, mesh)
  assert not host.real and "no fetch crosses a host link" in caplog.text  # CPU: logged, not a real host path
  assert jax.tree.leaves(host.weights)[0].sharding.memory_kind == host.kind
  rng = np.random.default_rng(1)

  def loss(home, dst, tables):
    out = host_fetch(host.weights, home, dst, tables, mesh, mechanism)
    return sum(jnp.sum(o * c) for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cot))), out

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  for per_device in (2, 2, 1):  # 2 then 1 row per device, at one capacity: the same program
    targets = random_targets(rng, per_device)
    (_, out), (d_home, d_dst) = step(home, dst, host_tables(targets, D, E, capacity=2))
    want, plain_vjp = jax.vjp(lambda h, t: plain(h, t, targets), home, dst)
    for got, ref in zip(jax.tree.leaves((out, d_home, d_dst)), jax.tree.leaves((want, *plain_vjp(cot)))):
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  assert step._cache_size() == 1  # traced rows: new fetches compile nothing


def test_host_tables_rejects_bad_fetches():
  with pytest.raises(ValueError, match="capacity"):
    host_tables([(0, 0, 1), (0, 1, 2)], D, E, capacity=1)
  with pytest.raises(ValueError, match="expert outside"):
    host_tables([(0, 0, E)], D, E)


def test_overlap_benchmark_smoke_writes_rows_and_calibration(tmp_path):
  """benchmarks/overlap.py --smoke on one CPU device: every path and move count has a row with the
  table's fields, and --calibrate writes the planner's calibration from the host rows."""
  import json
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  # One device; the caller's other XLA flags (scripts/test.sh's -O0) kept.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=1"]))
  out, cal = tmp_path / "overlap.json", tmp_path / "cal.json"
  subprocess.run([sys.executable, str(root / "benchmarks" / "overlap.py"), "--smoke", "--out", str(out), "--calibrate",
                  "--calibrate-out", str(cal)], check=True, env=env, cwd=root, capture_output=True, timeout=300)
  result = json.loads(out.read_text())
  assert {(r["path"], r["moves_per_layer"]) for r in result["rows"]} == {("host", 1), ("hbm", 1)}
  for r in result["rows"]:
    assert {"isolated_ms", "exposed_ms_per_expert_layer", "hidden_fraction", "card", "tokens"} <= r.keys()
  assert result["meta"]["host_fetch_check"] == {"slice": "ok", "gather": "ok"}
  calibration = json.loads(cal.read_text())
  assert calibration["card"] == "cpu" and calibration["host_exposed_ms"] >= 0 and calibration["link_exposed_ms"] > 0
