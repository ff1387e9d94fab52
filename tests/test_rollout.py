"""Rollout: captured routes replayed in a full forward give the same routes and log-probs; greedy; masks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from foremoe_jax.mesh import make_mesh
from foremoe_jax.model import Model
from foremoe_jax.rl.grpo import token_logprobs
from foremoe_jax.rl.rollout import local_rollout, local_rows, rollout, top_p_filter
from foremoe_jax.rl.task import EOS, PAD, ArithmeticTask, encode_prompts
from test_model import CFG, T, jit_forward

NEW = T - 7  # Shapes shared with test_model: its compiled forward is reused.


@pytest.fixture(scope="module")
def setup():
  model = Model(CFG, mesh=make_mesh(1, 8), rngs=nnx.Rngs(1))
  task = ArithmeticTask(num_digits=2, seed=0)
  prompts, lens = encode_prompts(task.tokenizer, [p for p, _ in task.sample(n=4)], 7)
  graphdef, _ = nnx.split(model)
  forward = functools.partial(jit_forward, graphdef, tables=None, capacity=model.no_drop_capacity(8, T))
  return model, prompts, lens, forward


def check_layout(out, prompts, lens, group_size):
  tokens, mask, lengths = np.asarray(out.tokens), np.asarray(out.completion_mask), np.asarray(out.lengths)
  plens = np.repeat(lens, group_size)
  np.testing.assert_array_equal(out.prompt_lengths, plens)
  np.testing.assert_array_equal(tokens[:, :prompts.shape[1]][np.arange(7)[None] < plens[:, None]],
                                np.repeat(prompts, group_size, 0)[np.arange(7)[None] < plens[:, None]])
  t = np.arange(tokens.shape[1])[None]
  np.testing.assert_array_equal(mask, (t >= plens[:, None] - 1) & (t < lengths[:, None] - 1))
  assert np.all(tokens[t >= lengths[:, None]] == PAD)
  for b in range(tokens.shape[0]):  # Stops at the first EOS, or after NEW tokens.
    completion = tokens[b, plens[b]:lengths[b]]
    assert (completion[-1] == EOS and EOS not in completion[:-1]) or (len(completion) == NEW and EOS not in completion)


def test_replayed_routes_give_the_rollout_logprobs(setup):
  model, prompts, lens, forward = setup
  out = rollout(model, prompts, lens, jax.random.key(0), max_new_tokens=NEW, group_size=2, temperature=1.0)
  check_layout(out, prompts, lens, 2)
  assert out.routes.shape == (8, 7 + NEW, 2, CFG.moe.top_k) and out.routes.dtype == jnp.int32
  state = nnx.state(model)
  replayed = forward(state, out.tokens, replay=out.routes)
  mask = np.asarray(out.completion_mask, bool)
  logp = np.asarray(token_logprobs(replayed.logits, out.tokens))
  np.testing.assert_allclose(logp[mask], np.asarray(out.logprobs)[mask], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out.logprobs)[~mask] == 0)
  # Live routing in a full forward picks the captured experts at every processed position.
  live = forward(state, out.tokens, replay=None)
  valid = np.arange(out.tokens.shape[1])[None] < np.asarray(out.lengths)[:, None]
  np.testing.assert_array_equal(np.asarray(live.routes)[valid], np.asarray(out.routes)[valid])


def test_zero_temperature_is_greedy(setup):
  model, prompts, lens, forward = setup
  greedy = rollout(model, prompts, lens, jax.random.key(1), max_new_tokens=NEW, group_size=2, temperature=0.0)
  cold = rollout(model, prompts, lens, jax.random.key(2), max_new_tokens=NEW, group_size=2, temperature=1e-4)
  np.testing.assert_array_equal(greedy.tokens, cold.tokens)
  check_layout(greedy, prompts, lens, 2)
  tokens, mask = np.asarray(greedy.tokens), np.asarray(greedy.completion_mask, bool)
  argmax = np.asarray(forward(nnx.state(model), greedy.tokens, replay=greedy.routes).logits).argmax(-1)
  np.testing.assert_array_equal(argmax[:, :-1][mask[:, :-1]], tokens[:, 1:][mask[:, :-1]])
  np.testing.assert_array_equal(tokens[0::2], tokens[1::2])  # Copies of a prompt agree when greedy.


def test_local_rollout_of_this_process_rows_equals_the_global_rollout(setup):
  """One process holds every row: local_rollout (prompt rows already repeated, numpy back) is the global
  rollout (tests/test_multiprocess.py splits the rows over two processes)."""
  model, prompts, lens, _ = setup
  assert local_rows(model.mesh, 8) == range(8)
  ref = rollout(model, prompts, lens, jax.random.key(3), max_new_tokens=NEW, group_size=2)
  out = local_rollout(model, np.repeat(prompts, 2, 0), np.repeat(lens, 2), jax.random.key(3), num_rows=8,
                      max_new_tokens=NEW)
  assert isinstance(out.tokens, np.ndarray) and out.tokens.shape[0] == 8
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(a, np.asarray(b))
  with pytest.raises(ValueError, match=r"holds batch rows \[0, 8\) of 8, so it needs 8 prompt rows"):
    local_rollout(model, prompts, lens, jax.random.key(3), num_rows=8, max_new_tokens=NEW)


def test_top_p_keeps_the_smallest_covering_set():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]]))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False], [False, True, False, False]])
  assert np.isfinite(np.asarray(top_p_filter(logits, 1.0))).all()


def test_bad_rollout_input_is_refused(setup):
  model, prompts, lens, _ = setup
  with pytest.raises(ValueError, match="not divisible"):
    rollout(model, prompts, lens, jax.random.key(0), max_new_tokens=NEW, group_size=1)
  with pytest.raises(ValueError, match="max_seq_len"):
    rollout(model, prompts, lens, jax.random.key(0), max_new_tokens=40, group_size=2)
  with pytest.raises(ValueError, match="top_p"):
    rollout(model, prompts, lens, jax.random.key(0), max_new_tokens=NEW, group_size=2, top_p=0.0)
