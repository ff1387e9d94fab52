"""Supervised next-token training on the arithmetic task (the SFT warm start before RL).

Loss: mean cross-entropy over answer tokens + EOS (the `task.encode_sft` mask) plus a small weight times
the MoE load-balance loss. One jitted step with donated (model, optimizer) state; batches are drawn from
`np.random.default_rng([seed, step])`, so a resumed run sees exactly the batches it would have seen.
"""
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from foremoe_jax import distributed
from foremoe_jax.checkpoint import Checkpointer
from foremoe_jax.mesh import batch_sharding, make_mesh
from foremoe_jax.model import Model
from foremoe_jax.rl.grpo import chunked_token_logprobs
from foremoe_jax.rl.rollout import rollout
from foremoe_jax.rl.task import ArithmeticTask

EVAL_STREAM = 10**9  # rng stream of the fixed eval prompts, apart from the training batches


@dataclasses.dataclass
class TrainState:
  """What the next stage (e.g. RL) continues from."""
  model: Model
  optimizer: nnx.Optimizer
  mesh: jax.sharding.Mesh
  task: ArithmeticTask
  step: int
  last_metrics: dict


def make_task(cfg):
  """`ArithmeticTask`, or with `task.kind="text"` a `text.task.TextTask` (its files are checked here)."""
  if cfg.task.kind == "text":
    from foremoe_jax.text.task import make_text_task  # noqa: PLC0415  (the `text` extra)
    return make_text_task(cfg.task, cfg.seed)
  return ArithmeticTask(num_digits=cfg.task.num_digits, ops=cfg.task.ops, seed=cfg.seed)


def seq_len(task: ArithmeticTask) -> int:
  """BOS + prompt + answer + EOS, at most."""
  return task.max_prompt_len + task.max_answer_len + 2


@functools.lru_cache
def make_tx(lr: float, warmup_steps: int, steps: int, weight_decay: float) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping. Cached: the transformation is part of the
  optimizer's graphdef, a static argument of `train_step`, so an equal config must reuse the same object."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1))
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=weight_decay))


def build(cfg, model: Model | None = None) -> tuple[jax.sharding.Mesh, Model, nnx.Optimizer]:
  """`model`: start from these weights (e.g. a loaded Hugging Face checkpoint) instead of a random init."""
  cfg.validate()
  mesh = model.mesh if model is not None else make_mesh(cfg.mesh_data, cfg.mesh_expert)
  model = model if model is not None else Model(cfg.model, mesh=mesh, rngs=nnx.Rngs(cfg.seed))
  s = cfg.sft
  optimizer = nnx.Optimizer(model, make_tx(s.lr, s.warmup_steps, s.steps, s.weight_decay), wrt=nnx.Param)
  # Scalar optimizer state (step counts) starts on one device; the train step returns it replicated
  # over the mesh. Place it there now so the second step does not recompile.
  replicated = NamedSharding(mesh, P())
  nnx.update(optimizer, jax.tree.map(
      lambda a: a if isinstance(a.sharding, NamedSharding) else jax.device_put(a, replicated), nnx.state(optimizer)))
  return mesh, model, optimizer


def sft_loss(model: Model, tokens_BxT, loss_mask_BxT, aux_weight: float):
  out = model(tokens_BxT, logits=False)
  logp_BxT = chunked_token_logprobs(out.hidden, model.lm_head[...], tokens_BxT, chunk=model.cfg.logprob_chunk)
  mask_BxT = loss_mask_BxT.astype(jnp.float32)
  ce = -jnp.sum(logp_BxT * mask_BxT) / jnp.maximum(mask_BxT.sum(), 1.0)
  return ce + aux_weight * out.aux_loss, {"ce": ce, "aux_loss": out.aux_loss, "dropped": out.dropped}


@functools.partial(jax.jit, static_argnames=("graphdef", "aux_weight"), donate_argnums=(1,))
def train_step(graphdef, state, tokens_BxT, loss_mask_BxT, *, aux_weight: float):
  """(model, optimizer) state -> new state, metrics."""
  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = nnx.value_and_grad(sft_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(model, tokens_BxT, loss_mask_BxT, aux_weight)
  optimizer.update(model, grads)
  return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}


def evaluate(model: Model, task: ArithmeticTask, num_prompts: int, seed: int) -> float:
  """Accuracy (`task.correct`: exact match, or verified for text) of greedy completions on fixed prompts."""
  pairs = task.sample(np.random.default_rng([seed, EVAL_STREAM]), num_prompts)
  prompts_NxP, lens_N = task.prompt_batch([p for p, _ in pairs])
  tok = task.tokenizer
  out = rollout(model, prompts_NxP, lens_N, jax.random.key(seed), max_new_tokens=task.max_answer_len + 1,
                temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
  tokens_BxT, lens_B = distributed.to_host((out.tokens, out.lengths))
  rewards = [task.correct(tok.decode(tokens_BxT[b, lens_N[b]:lens_B[b]]), a) for b, (_, a) in enumerate(pairs)]
  return float(np.mean(rewards))


def _ckpt_state(model, optimizer) -> dict:
  return {"model": nnx.state(model).to_pure_dict(), "opt": nnx.state(optimizer).to_pure_dict()}


def restore(ckpt: Checkpointer, model, optimizer) -> int:
  """Loads the newest readable checkpoint into model and optimizer; returns its step (0 when there is none)."""
  restored = ckpt.restore_latest(_ckpt_state(model, optimizer))
  distributed.check_same_across_processes([np.asarray(-1 if restored is None else restored[0])],
                                          "the SFT step to resume")
  if restored is None:
    return 0
  step, saved, _ = restored
  for obj, key in ((model, "model"), (optimizer, "opt")):
    state = nnx.state(obj)
    nnx.replace_by_pure_dict(state, saved[key])
    nnx.update(obj, state)
  return step


def run_sft(cfg, run_dir: str, *, resume: bool = False, logger=None, model: Model | None = None,
            task=None) -> TrainState:
  """Trains `cfg.sft.steps` steps (continuing from the last checkpoint with `resume`), from `model`'s
  weights when given, on `task` (default: `make_task(cfg)`, built before any device work)."""
  task = make_task(cfg) if task is None else task
  mesh, model, optimizer = build(cfg, model)
  ckpt = Checkpointer(os.path.join(run_dir, "ckpt"))
  start = restore(ckpt, model, optimizer) if resume else 0
  if resume and logger is not None:
    logger.rewind("sft/", start + 1)  # steps logged after the checkpoint run again
  s, sharding = cfg.sft, batch_sharding(mesh)
  graphdef, state = nnx.split((model, optimizer))
  metrics, host = {}, {}
  bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc="sft", dynamic_ncols=True)
  tic = time.perf_counter()
  for step in bar:
    batch = task.sft_batch(np.random.default_rng([cfg.seed, step]), s.batch_size, seq_len(task))
    tokens, mask = (jax.device_put(batch[k], sharding) for k in ("tokens", "loss_mask"))
    state, metrics = train_step(graphdef, state, tokens, mask, aux_weight=s.aux_loss_weight)
    done = step + 1
    if done % s.log_every == 0 or done == s.steps:
      host = {k: float(v) for k, v in metrics.items()}
      host["steps_per_s"] = (done - start) / (time.perf_counter() - tic)
      bar.set_postfix(loss=f"{host['loss']:.3f}", ce=f"{host['ce']:.3f}")
      if logger is not None:
        logger.log(done, {"sft/" + k: v for k, v in host.items()})
    if done % s.ckpt_every == 0 or done == s.steps:
      nnx.update((model, optimizer), state)
      ckpt.save(done, _ckpt_state(model, optimizer), {"step": done, "stage": "sft", "config": cfg.name})
  bar.close()
  nnx.update((model, optimizer), state)
  ckpt.close()
  return TrainState(model, optimizer, mesh, task, max(start, s.steps), host)
