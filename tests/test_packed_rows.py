"""Packed rows (several sequences per row) give the same per-sequence log-probs, GRPO loss and gradients as
one sequence per row, with replayed routes and a placement with replicas; padding is routed nowhere."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from foremoe_jax.dispatch import padded_exchange, route
from foremoe_jax.mesh import make_mesh
from foremoe_jax.moe import ExpertsConfig, MoE, MoEConfig
from foremoe_jax.model import Model, ModelConfig
from foremoe_jax.placement import make_tables, single_copy_share, stack_tables
from foremoe_jax.planner import home_placement
from foremoe_jax.rl.grpo import token_logprobs
from foremoe_jax.rl.microbatch import build_step_batches, spread_routes, with_advantages
from foremoe_jax.rl.packing import place_rows, segments_and_positions
from foremoe_jax.rl.trainer import grpo_objective
from moe_reference import cpu_mesh, dense_moe, random_placement

E, K, D, S, T = 16, 2, 8, 3, 12
CFG = ModelConfig(vocab_size=18, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff_dense=48,
                  moe=ExpertsConfig(num_experts=E, top_k=K, d_ff_expert=16, slots_per_device=S), max_seq_len=16)
# A row of its own (12 = T), rows of several sequences, and (8 devices x 2 rows) empty rows.
LENGTHS = np.array([12, 11, 2, 3, 2, 5, 4, 6, 2, 3, 7, 2, 4, 3, 5, 2])


def replicated_tables(rng):
  """A random placement with replicas and uneven splits per MoE layer."""
  return stack_tables([make_tables(*random_placement(rng, E, D, S), E) for _ in range(2)])


def sequences(rng):
  """Per-sequence [N, T] arrays: tokens (garbage past the end), routes that never pick expert 0, a
  completion mask, advantages and old / reference log-probs."""
  n = LENGTHS.size
  tokens = rng.integers(0, CFG.vocab_size, (n, T)).astype(np.int32)
  routes = np.stack([1 + rng.permutation(E - 1)[:K] for _ in range(n * T * 2)]).reshape(n, T, 2, K).astype(np.int32)
  routes = np.where((np.arange(T)[None, :] >= LENGTHS[:, None])[..., None, None], spread_routes(routes.shape, E),
                    routes)  # valid ids past the end; one-per-row rows route them, packed rows drop them
  prompt = rng.integers(1, LENGTHS)
  cols = np.arange(T)[None, :]
  mask = ((cols >= prompt[:, None] - 1) & (cols < LENGTHS[:, None] - 1)).astype(np.int32)
  adv = rng.normal(size=n).astype(np.float32)
  logp_old = rng.normal(-2.0, 0.3, (n, T)).astype(np.float32)
  return tokens, routes, mask, adv, logp_old, logp_old - 0.1


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def loss_and_grads(graphdef, state, batch, tables, capacity):
  def loss(state):
    return grpo_objective(nnx.merge(graphdef, state), batch, tables=tables, working=None, capacity=capacity,
                          clip_eps=0.2, kl_coef=0.1)
  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state)
  return value, metrics["logp"], metrics["dropped"], grads


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def routed_counts(graphdef, state, batch, tables, capacity):
  model = nnx.merge(graphdef, state)
  return model(batch["tokens"], tables, batch["replay"], capacity=capacity, segment_ids=batch.get("segment_ids"),
               positions=batch.get("positions")).counts


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("scan_layers,remat", [(False, "none"), (True, "block")])
def test_packed_rows_equal_one_sequence_per_row(scan_layers, remat):
  rng = np.random.default_rng(0)
  cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": scan_layers, "remat": remat})
  model = Model(cfg, mesh=make_mesh(1, D), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tables = replicated_tables(rng)
  tokens, routes, mask, adv, logp_old, logp_ref = sequences(rng)
  n = LENGTHS.size
  capacity = model.no_drop_capacity(2 * D, T)

  reference = dict(tokens=tokens, replay=routes, mask=mask, adv=adv, logp_old=logp_old, logp_ref=logp_ref,
                   num_tokens=np.float32(mask.sum()))
  want_loss, want_logp, dropped, want_grads = loss_and_grads(graphdef, state, reference, tables, capacity)
  assert int(dropped) == 0

  step = build_step_batches(tokens, routes, mask, LENGTHS, num_shards=D, expert_devices=D, rows_per_shard=2,
                            tokens_per_shard=16, num_experts=E, num_minibatches=1, pack_sequences=True)
  p = step.packing
  segment = segments_and_positions(p)[0].reshape(-1, T)
  per_row = [len(set(r[r > 0])) for r in segment]
  assert 1 in per_row and 0 in per_row and max(per_row) >= 2  # a lone sequence, an empty row, shared rows
  assert step.real_token_share == LENGTHS.sum() / (p.num_micro_steps * 2 * D * T)
  m = p.num_micro_steps

  def rows(x):
    return place_rows(x, p, 0).reshape(m, 2 * D, T)
  old, ref = rows(logp_old), rows(logp_ref)
  loss, logp_rows, grads = 0.0, [], None
  for i, batch in enumerate(with_advantages(step, adv)):
    assert batch["adv"].shape == (2 * D, T) and batch["num_tokens"] == mask.sum()
    value, logp, dropped, g = loss_and_grads(graphdef, state, dict(batch, logp_old=old[i], logp_ref=ref[i]), tables,
                                             capacity)
    assert int(dropped) == 0
    loss, grads = loss + value, g if grads is None else jax.tree.map(jnp.add, grads, g)
    logp_rows.append(np.asarray(logp))
    # The MoE layers route real tokens only, at their packed positions: the planner's counts.
    counts = np.asarray(routed_counts(graphdef, state, batch, tables, capacity))
    np.testing.assert_array_equal(counts, step.counts_MxLxDxE[i].sum(axis=1))
    assert (counts[:, 0] == 0).all()  # an expert with no tokens

  logp_rows = np.stack(logp_rows).reshape(-1, T)
  row_N = (p.micro_step_N * D + p.device_N) * 2 + p.row_N
  for s in range(n):  # positions that predict a token of the sequence
    got = logp_rows[row_N[s], p.offset_N[s]:p.offset_N[s] + LENGTHS[s] - 1]
    assert rel_err(got, want_logp[s, :LENGTHS[s] - 1]) <= 1e-5, s
    assert logp_rows[row_N[s], p.offset_N[s] + LENGTHS[s] - 1] == 0.0  # never across the boundary
  assert rel_err(loss, want_loss) <= 1e-5
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)
  assert np.abs(jax.tree.leaves(want_grads)[0]).max() > 0


def test_one_segment_per_row_at_arange_positions_is_the_plain_forward():
  """segment_ids = 1 and positions = 0..T-1 everywhere: the same logits as without them; positions
  that are not a shift of those (RoPE is shift-invariant) change them."""
  model = Model(CFG, mesh=make_mesh(1, D), rngs=nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(0), (D, T), 0, CFG.vocab_size)
  plain = jax.jit(lambda m, x: m(x).logits)(model, tokens)
  ones, arange = jnp.ones((D, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (D, T))
  packed = jax.jit(lambda m, x, s, q: m(x, segment_ids=s, positions=q).logits)
  assert rel_err(packed(model, tokens, ones, arange), plain) <= 1e-6
  assert rel_err(packed(model, tokens, ones, 2 * arange), plain) > 1e-3


def test_token_logprobs_stop_at_segment_boundaries():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 5, (2, 6)), jnp.int32)
  segment = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  plain, packed = token_logprobs(logits, tokens), token_logprobs(logits, tokens, segment)
  keep = np.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(np.asarray(packed)[keep], np.asarray(plain)[keep])
  assert (np.asarray(packed)[~keep] == 0).all()


def test_model_refuses_half_the_packing_inputs():
  model = Model(CFG, mesh=make_mesh(1, D), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((D, T), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids and positions together"):
    model(tokens, segment_ids=jnp.ones((D, T), jnp.int32))
  with pytest.raises(ValueError, match=r"must be \[B, T\]"):
    model(tokens, segment_ids=jnp.ones((D, T + 1), jnp.int32), positions=jnp.zeros((D, T + 1), jnp.int32))


def test_moe_routes_masked_tokens_nowhere():
  """token_mask: masked tokens get y = 0 and are in no count; the rest match the dense reference, values and
  gradients, under a placement with replicas (data x expert mesh; expert 0 gets no token)."""
  rng = np.random.default_rng(5)
  mesh, b, t = cpu_mesh(2, 4), 8, 6
  moe = MoE(MoEConfig(d_model=16, d_ff_expert=8, num_experts=E, top_k=K, slots_per_device=5), mesh=mesh,
            rngs=nnx.Rngs(0))
  tables = make_tables(*random_placement(rng, E, 4, 5), E)
  x = jnp.asarray(rng.normal(size=(b, t, 16)), jnp.float32)
  replay = jnp.asarray(np.stack([1 + rng.permutation(E - 1)[:K] for _ in range(b * t)]).reshape(b, t, K), jnp.int32)
  mask = jnp.asarray(rng.random((b, t)) < 0.6).at[0].set(False)  # one row all padding
  cot = jnp.asarray(rng.normal(size=(b, t, 16)), jnp.float32)
  graphdef, state = nnx.split(moe)

  @jax.jit
  def layer(state):
    out = nnx.merge(graphdef, state)(x, tables, replay, capacity=b * t * K, token_mask=mask)
    return jnp.sum(out.y * cot), out

  def reference(params):
    return jnp.sum(jnp.where(mask[..., None], dense_moe(*params, x, K, replay), 0.0) * cot)

  (loss, out), grads = jax.value_and_grad(layer, has_aux=True)(state)
  params = (moe.router[...], moe.w_gate_up[...], moe.w_down[...])
  want, want_grads = jax.value_and_grad(reference)(params)
  assert rel_err(loss, want) <= 1e-5
  g = nnx.merge(graphdef, grads)
  for got, w in zip((g.router[...], g.w_gate_up[...], g.w_down[...]), want_grads):
    assert rel_err(got, w) <= 1e-5
  assert (np.asarray(out.y)[~np.asarray(mask)] == 0).all()
  want_counts = np.bincount(np.asarray(replay)[np.asarray(mask)].reshape(-1), minlength=E)
  np.testing.assert_array_equal(out.counts, want_counts)
  assert want_counts[0] == 0 and int(out.slot_counts.sum()) == want_counts.sum() and int(out.dropped) == 0


def test_padded_exchange_gives_pairs_routed_nowhere_no_row():
  """route(masked=True) + padded_exchange: a pair of expert id E claims no buffer row, so its token gets 0
  even where the experts write every row (here rows + 1, empty rows included)."""
  mesh, n, h = cpu_mesh(1, 4), 6, 8
  slot_expert = home_placement(E, 4, 4)
  share = single_copy_share(slot_expert)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4 * n, h)), jnp.float32)
  expert = rng.integers(0, E, (4 * n, K)).astype(np.int32)
  expert[rng.random(4 * n) < 0.4] = E  # routed nowhere
  gate = jnp.asarray(rng.uniform(0.5, 1.0, (4 * n, K)), jnp.float32)

  def local(x_NxH, expert_NxK, gate_NxK, slot_expert_G, share_DxG):
    routing = route(expert_NxK.reshape(-1), slot_expert_G, share_DxG[jax.lax.axis_index("expert")], E, masked=True)
    y, _, dropped = padded_exchange(x_NxH, gate_NxK, routing, 4, n * K, lambda rows, sizes: rows + 1.0, masked=True)
    return y, dropped[None]

  spec = jax.sharding.PartitionSpec("expert")
  y, dropped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, None, None),
                                     out_specs=(spec, spec)))(x, jnp.asarray(expert), gate,
                                                              jnp.asarray(slot_expert.reshape(-1)), jnp.asarray(share))
  real_NxK = expert < E
  want = (np.asarray(x)[:, None, :] + 1.0) * np.where(real_NxK, np.asarray(gate), 0.0)[..., None]
  np.testing.assert_allclose(y, want.sum(axis=1), rtol=1e-6, atol=1e-6)
  assert (np.asarray(dropped) == 0).all()
