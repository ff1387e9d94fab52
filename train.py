"""CLI: `python train.py` runs the CPU default (cpu_tiny on 8 virtual CPU devices): an SFT warm start,
then GRPO post-training whose recompute and update stages balance experts per micro-step (foresight).

  python train.py --config gpu_4 --policy foremoe --set rl.steps=50 --run-dir runs/a --resume
  python train.py --config gpu_8 --init-from /ckpt/Qwen3-30B-A3B --export-to /ckpt/out  (Hugging Face, docs/hf.md)
Stages live in `foremoe_jax/` (`run_sft`, then `rl.trainer.GRPOTrainer`).
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time

from foremoe_jax import distributed


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="cpu_tiny", help="preset name (configs/)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. sft.steps=50 or model.d_model=128 (repeatable)")
  p.add_argument("--run-dir", default=None, help="default: runs/<config>")
  p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
  p.add_argument("--sft-steps", type=int, default=None)
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--rl-steps", type=int, default=None, help="0 skips RL")
  p.add_argument("--policy", default=None,
                 help="placement policy of the RL stages: static | eplb_history | eplb_step | eplb_microstep | foremoe")
  p.add_argument("--init-from", default=None, metavar="DIR",
                 help="start from a Hugging Face checkpoint (config.json + *.safetensors of Qwen3-MoE or OLMoE); "
                      "its config replaces the preset's architecture")
  p.add_argument("--export-to", default=None, metavar="DIR",
                 help="write the final policy as Hugging Face safetensors + config.json")
  p.add_argument("--overwrite", action="store_true", help="let --export-to write into a non-empty directory")
  return p.parse_args(argv)


def check_paths(args, run_dir: str) -> None:
  """The run's paths, before any device work: --resume needs a run to continue, --export-to an empty (or
  new) directory unless --overwrite, --init-from an existing one."""
  if args.resume and not os.path.isdir(run_dir):
    raise FileNotFoundError(f"--resume: run directory {run_dir!r} does not exist (nothing to resume; "
                            "drop --resume to start a new run)")
  if args.init_from and not os.path.isdir(args.init_from):
    raise FileNotFoundError(f"--init-from: {args.init_from!r} is not a directory")
  if args.export_to and os.path.isdir(args.export_to) and os.listdir(args.export_to) and not args.overwrite:
    raise FileExistsError(f"--export-to: {args.export_to!r} is not empty; pass --overwrite to write into it")


def write_samples(run_dir: str, records: list[dict]) -> str:
  """`samples.jsonl`: the decoded sample responses of every RL step (one line per step)."""
  path = os.path.join(run_dir, "samples.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps({"step": r["step"], "samples": r["samples"]}, ensure_ascii=False) + "\n")
  return path


def main(argv=None):
  args = parse_args(argv)
  distributed.setup_cpu_devices()
  import jax  # noqa: E402  (after the XLA flags)

  import configs
  from foremoe_jax import convert
  from foremoe_jax.backends import choose_dispatch
  from foremoe_jax.load_monitor import plot_load
  from foremoe_jax.mesh import make_mesh
  from foremoe_jax.metrics import MetricsLogger, plot_run, write_summary
  from foremoe_jax.rl.report import summarize
  from foremoe_jax.rl.trainer import GRPOTrainer
  from foremoe_jax.sft import evaluate, make_task, run_sft
  from pallas_kernels.backend import resolve

  logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
  for name in ("foremoe_jax", "pallas_kernels"):  # which backends run is said once, never silently
    logging.getLogger(name).setLevel(logging.INFO)
  distributed.initialize(jax)
  writer = distributed.is_writer()
  overrides = list(args.set)
  overrides += [f"sft.steps={args.sft_steps}"] if args.sft_steps is not None else []
  overrides += [f"seed={args.seed}"] if args.seed is not None else []
  overrides += [f"rl.steps={args.rl_steps}"] if args.rl_steps else []
  overrides += [f"rl.policy={args.policy}"] if args.policy is not None else []
  cfg = configs.apply_overrides(configs.get_config(args.config), overrides)
  check_paths(args, args.run_dir or os.path.join("runs", cfg.name))
  if args.init_from and cfg.task.kind == "text" and not any(o.strip().startswith("task.tokenizer=") for o in args.set):
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, tokenizer=args.init_from))  # its own
  source_config, init_model = None, None
  if args.init_from:  # the checkpoint decides the architecture; explicit model.* overrides must agree
    source_config = convert.read_config(args.init_from)
    explicit = {o.partition("=")[0].strip().removeprefix("model.") for o in args.set
                if o.strip().startswith("model.")}
    cfg = dataclasses.replace(cfg, model=convert.merge_with_overrides(source_config, cfg.model, explicit,
                                                                      cfg.mesh_expert))
  cfg = cfg.validate()
  task = make_task(cfg)  # tokenizer and prompt files are checked before any device work
  if task.tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"tokenizer {task.tokenizer.name!r} has {task.tokenizer.vocab_size} ids > model.vocab_size="
                     f"{cfg.model.vocab_size}")
  if args.init_from:
    init_model = convert.load_model(args.init_from, cfg.model, make_mesh(cfg.mesh_data, cfg.mesh_expert))
  run_dir = args.run_dir or os.path.join("runs", cfg.name)
  tic = time.perf_counter()
  # Process 0 writes the run's files; every process trains (checkpoints are saved by all together).
  with MetricsLogger(run_dir) if writer else contextlib.nullcontext() as logger:
    state = run_sft(cfg, run_dir, resume=args.resume, logger=logger, model=init_model, task=task)
    policy = state.model
    accuracy = evaluate(state.model, state.task, cfg.sft.eval_prompts, cfg.seed)
    if logger is not None:
      logger.rewind("sft/accuracy", state.step)  # a resumed run evaluates again: one record per step
      logger.log(state.step, {"sft/accuracy": accuracy})
    print(f"sft: {state.step} steps, loss {state.last_metrics.get('loss')}, greedy exact-match accuracy "
          f"{accuracy:.3f}, {time.perf_counter() - tic:.0f} s")
    summary = {"config": cfg.name, "sft_steps": state.step, "sft_final_loss": state.last_metrics.get("loss"),
               "sft_accuracy": accuracy, "devices": jax.device_count(), "processes": jax.process_count(),
               "backend": jax.default_backend(),
               "dispatch": choose_dispatch(cfg.model.moe.dispatch),
               "gmm_backend": resolve("gmm", cfg.model.moe.gmm_backend),
               "dispatch_backend": resolve("permute", cfg.model.moe.dispatch_backend),
               **task.describe()}
    if args.rl_steps != 0:
      trainer = GRPOTrainer(cfg, state.model, state.mesh, state.task, run_dir)
      records = trainer.run(logger, resume=args.resume)
      policy = trainer.policy()
      if records:
        summary.update(summarize(records, cfg.rl.policy))
        summary["response_length"] = records[-1]["response_length"]
        summary["samples"] = records[-1]["samples"]
        if writer:
          summary["plot"] = plot_run(records, os.path.join(run_dir, "imbalance_reward.png"))
          summary["load_plot"] = plot_load(records, os.path.join(run_dir, "expert_load.png"))
          summary["samples_file"] = write_samples(run_dir, records)
  if args.export_to:
    files = convert.export_model(policy, args.export_to, base_config=source_config)
    if args.init_from:
      files += convert.copy_tokenizer_files(args.init_from, args.export_to)
    print(f"exported {len(files)} files -> {args.export_to}")
  summary["seconds"] = time.perf_counter() - tic
  print(json.dumps({k: summary.get(k) for k in ("steps", "reward_first", "reward_last", "imbalance",
                                                 "seconds_per_stage", "tokens_per_s", "train_tokens_per_s",
                                                 "plan_wait_share", "moe_flop_share")}, indent=1))
  if writer:
    print(f"summary -> {write_summary(run_dir, summary)}")
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
