"""Transfer engine: rounds of ppermute with traced rows; values, gradients, no recompiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foremoe_jax.placement import make_tables
from foremoe_jax.transfer import (apply_moves, apply_moves_transpose, fill_moves, flush_rows, hold_rows, hold_tables,
                                  home_to_base, home_to_base_moves, home_to_base_transpose, local_copies_needed,
                                  materialize, move_tables, moves_needed)
from moe_reference import cpu_mesh, random_placement

E, D, S, X = 16, 8, 3, 5


def random_weights(seed, rows):
  return jax.random.normal(jax.random.key(seed), (rows, X, 2))


def test_materialize_gathers_and_sums_replica_gradients():
  mesh = cpu_mesh(1, D)
  rng = np.random.default_rng(0)
  slot_expert, share = random_placement(rng, E, D, S)
  home = random_weights(0, E)
  tables = make_tables(slot_expert, share, E)
  working = jax.jit(lambda h: materialize(h, tables, mesh))(home)
  expect = np.asarray(home)[np.maximum(slot_expert, 0)]
  np.testing.assert_array_equal(working, expect)
  cot = jax.random.normal(jax.random.key(1), working.shape)
  grad = jax.jit(jax.grad(lambda h: jnp.sum(materialize(h, tables, mesh) * cot)))(home)
  want = np.zeros_like(np.asarray(home))
  np.add.at(want, np.maximum(slot_expert, 0).reshape(-1), np.asarray(cot).reshape(D * S, X, 2))
  np.testing.assert_allclose(grad, want, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_home_to_base_then_fill_matches_numpy(seed):
  mesh = cpu_mesh(1, D)
  rng = np.random.default_rng(seed)
  base, _ = random_placement(rng, E, D, S, empty_fraction=0.0)
  micro, _ = random_placement(rng, E, D, S, empty_fraction=0.2)
  home = random_weights(seed, E)
  to_base = home_to_base_moves(base, E)
  base_tables = move_tables(to_base, D, moves_needed(to_base, D))
  fill = fill_moves(micro, base)
  fill_tables = move_tables(fill, D, max(1, moves_needed(fill, D)))

  @jax.jit
  def run(home):
    base_w = home_to_base(home, base_tables, mesh, S)
    return base_w, apply_moves(base_w, base_w, fill_tables, mesh)

  base_w, working = run(home)
  home_np = np.asarray(home)
  np.testing.assert_array_equal(base_w, home_np[np.maximum(base.reshape(-1), 0)])
  want = np.where((micro >= 0).reshape(-1)[:, None, None], home_np[np.maximum(micro.reshape(-1), 0)],
                  home_np[np.maximum(base.reshape(-1), 0)])
  np.testing.assert_array_equal(working, want)
  cot = jax.random.normal(jax.random.key(2), working.shape)
  grad = jax.jit(jax.grad(lambda h: jnp.sum(run(h)[1] * cot)))(home)
  source = np.where(micro >= 0, micro, base).reshape(-1)
  expect = np.zeros_like(home_np)
  np.add.at(expect, source, np.asarray(cot))
  np.testing.assert_allclose(grad, expect, rtol=1e-5, atol=1e-6)


def test_new_moves_do_not_recompile_and_idle_rounds_are_skipped():
  mesh = cpu_mesh(1, D)
  rng = np.random.default_rng(3)
  base, _ = random_placement(rng, E, D, S, empty_fraction=0.0)
  traces = []

  @jax.jit
  def fill(w, tables):
    traces.append(1)
    return apply_moves(w, w, tables, mesh)

  home = random_weights(4, E)
  w = home[base.reshape(-1)]
  for _ in range(3):
    micro = base.copy()
    d, j = rng.integers(D), rng.integers(S)
    micro[d, j] = rng.integers(E)
    tables = move_tables(fill_moves(micro, base), D, 1)
    assert tables.active_R.sum() <= 1
    out = fill(w, tables)
    np.testing.assert_array_equal(out, home[micro.reshape(-1)])
  assert len(traces) == 1


def test_overfull_round_is_refused():
  with pytest.raises(ValueError, match="capacity=1"):
    move_tables([(0, 0, 1, 0), (0, 1, 1, 1)], 4, 1)


def test_a_base_that_keeps_experts_home_moves_only_the_others():
  """Experts kept in their home rows cost no move (the padded home has them): only the extra slots'
  replicas move, a few rows, in remote rounds and local copies of their own sizes; an emptied home row
  keeps its stale expert and passes no gradient."""
  base, _ = random_placement(np.random.default_rng(5), E, D, S, empty_fraction=0.0)
  home_like = np.full((D, S), -1, np.int32)
  home_like[:, :E // D] = np.arange(E).reshape(D, E // D)
  home_like[:, E // D:] = base[:, E // D:]
  home_like[0, 0] = -1 if (home_like == 0).sum() > 1 else 0  # expert 0 has a replica elsewhere: drop its home row
  moves = home_to_base_moves(home_like, E)
  assert sorted((d, j) for _, _, d, j in moves) == [(d, j) for d in range(D) for j in range(E // D, S)]
  tables = move_tables(moves, D, max(1, moves_needed(moves, D)), max(1, local_copies_needed(moves, D)))
  assert tables.send_DxRxK.shape[-1] == moves_needed(moves, D) <= S - E // D
  assert tables.local_src_DxL.shape[-1] <= S - E // D
  mesh = cpu_mesh(1, D)
  home = random_weights(6, E)
  out = jax.jit(lambda h: home_to_base(h, tables, mesh, S))(home)
  np.testing.assert_array_equal(out, np.asarray(home)[np.where(home_like >= 0, home_like, 0).reshape(-1)])
  cot = random_weights(7, D * S) * (home_like >= 0).reshape(-1, 1, 1)  # an empty slot gets no gradient
  grad = jax.jit(lambda g: home_to_base_transpose(g, tables, mesh, E // D))(cot)
  want = np.zeros_like(np.asarray(home))
  np.add.at(want, np.maximum(home_like.reshape(-1), 0), np.asarray(cot))
  np.testing.assert_allclose(grad, want, rtol=1e-6)


def value_and_vjp(f, x, cot):
  """(f(x), the vjp of f at x applied to cot), autodiff in one jitted program."""
  def run(x, cot):
    y, vjp = jax.vjp(f, x)
    return y, vjp(cot)[0]
  return jax.jit(run)(x, cot)


@pytest.mark.parametrize("seed,exchange", [(0, "ppermute"), (2, "all_to_all")])
def test_explicit_transposes_equal_autodiff(seed, exchange):
  """Every exchange moves the same rows as the plain ppermute rounds ("ppermute_all", no conds), and the
  explicit transposes (touching only moved rows) equal autodiff of those rounds, for a base transfer (two
  arrays), the padded-home base transfer and a fill (one array read and written), with local copies and
  remote rows."""
  mesh = cpu_mesh(1, D)
  rng = np.random.default_rng(seed)
  base, _ = random_placement(rng, E, D, S, empty_fraction=0.0)
  micro, _ = random_placement(rng, E, D, S, empty_fraction=0.2)
  to_base, fill = home_to_base_moves(base, E), fill_moves(micro, base)
  base_tables = move_tables(to_base, D, moves_needed(to_base, D), S)
  fill_tables = move_tables(fill, D, max(1, moves_needed(fill, D)), S)
  home = random_weights(seed, E)
  base_w = random_weights(seed + 1, D * S)
  cot = random_weights(seed + 2, D * S)
  zeros = jnp.zeros((D * S, X, 2))
  moved, to_home = value_and_vjp(lambda h: apply_moves(h, zeros, base_tables, mesh, "ppermute_all"), home, cot)
  np.testing.assert_array_equal(jax.jit(lambda h: apply_moves(h, zeros, base_tables, mesh, exchange))(home), moved)
  np.testing.assert_allclose(
      jax.jit(lambda g: apply_moves_transpose(g, jnp.zeros_like(home), base_tables, mesh, exchange))(cot),
      to_home, rtol=1e-5, atol=1e-6)
  built, padded_to_home = value_and_vjp(lambda h: home_to_base(h, base_tables, mesh, S, "ppermute_all"), home, cot)
  np.testing.assert_array_equal(jax.jit(lambda h: home_to_base(h, base_tables, mesh, S, exchange))(home), built)
  np.testing.assert_allclose(
      jax.jit(lambda g: home_to_base_transpose(g, base_tables, mesh, E // D, exchange))(cot),
      padded_to_home, rtol=1e-5, atol=1e-6)
  filled, to_base_w = value_and_vjp(lambda b: apply_moves(b, b, fill_tables, mesh, "ppermute_all"), base_w, cot)
  np.testing.assert_array_equal(jax.jit(lambda b: apply_moves(b, b, fill_tables, mesh, exchange))(base_w), filled)
  np.testing.assert_allclose(jax.jit(lambda g: apply_moves_transpose(g, None, fill_tables, mesh, exchange))(cot),
                             to_base_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exchange", ["ppermute", "all_to_all"])
def test_held_rows_wait_and_flush_to_their_sources(exchange):
  """hold_rows moves a fill's written rows from a gradient into their rows of the compact held
  accumulator (H rows per device, no exchange); flush_rows adds held rows to the base rows they were read
  from (replicas of one expert on several devices sum into one row, local copies and remote rows) and
  zeroes them."""
  mesh = cpu_mesh(1, D)
  rng = np.random.default_rng(4)
  base, _ = random_placement(rng, E, D, S, empty_fraction=0.0)
  micro = base.copy()
  micro[:, 2] = 0  # expert 0 on every device: seven replicas read from one base row, one local
  micro[1, 1] = base[1, 0]  # a copy within device 1
  fill = fill_moves(micro, base)
  held_rows = 4  # each device's written slots in its held rows from the last one down (not the slot order)
  row = {mv: held_rows - 1 - sum(other[2] == mv[2] for other in fill[:k]) for k, mv in enumerate(fill)}
  holds = hold_tables([(mv[2], mv[3], row[mv]) for mv in fill], D, held_rows)
  flush_list = [(*mv[:3], row[mv]) for mv in fill]
  tables = move_tables(flush_list, D, max(1, moves_needed(fill, D)), max(1, local_copies_needed(fill, D)))
  grad, d_base = (np.asarray(random_weights(seed, D * S)) for seed in (8, 10))
  held = np.asarray(random_weights(9, D * held_rows))
  got_grad, got_held = jax.jit(lambda g, h: hold_rows(g, h, holds, mesh))(grad, held)
  dst = np.array([d * S + j for _, _, d, j in fill])
  held_at = np.array([mv[2] * held_rows + row[mv] for mv in fill])
  assert len(set(held_at)) == len(fill) == len(set(dst))
  want_grad, want_held = grad.copy(), held.copy()
  want_held[held_at] += grad[dst]
  want_grad[dst] = 0
  np.testing.assert_array_equal(got_grad, want_grad)
  np.testing.assert_allclose(got_held, want_held, rtol=1e-6)
  got_base, flushed = jax.jit(lambda h, b: flush_rows(h, b, tables, mesh, exchange))(held, d_base)
  want_base, want_flushed = d_base.copy(), held.copy()
  np.add.at(want_base, [d * S + j for d, j, _, _ in fill], held[held_at])
  want_flushed[held_at] = 0
  np.testing.assert_allclose(got_base, want_base, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(flushed, want_flushed)
