"""CLI: `python train.py` runs the CPU default (cpu_tiny: SFT on 8 virtual CPU devices).

  python train.py --config gpu_4 --set sft.steps=2000 --set model.dtype=bfloat16 --run-dir runs/a --resume
Stages live in `foremoe_jax/` (`run_sft` returns the `TrainState` the next stage continues from).
"""
import argparse
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="cpu_tiny", help="preset name (configs/)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. sft.steps=50 or model.d_model=128 (repeatable)")
  p.add_argument("--run-dir", default=None, help="default: runs/<config>")
  p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
  p.add_argument("--sft-steps", type=int, default=None)
  p.add_argument("--seed", type=int, default=None)
  return p.parse_args(argv)


def setup_devices() -> None:
  """8 virtual CPU devices unless an accelerator platform is requested (must run before importing jax)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  flags = os.environ.get("XLA_FLAGS", "")
  if platforms in ("", "cpu") and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()


def main(argv=None):
  args = parse_args(argv)
  setup_devices()
  import jax  # noqa: E402  (after the XLA flags)

  import configs
  from foremoe_jax.metrics import MetricsLogger, write_summary
  from foremoe_jax.sft import evaluate, run_sft

  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()
  overrides = list(args.set)
  overrides += [f"sft.steps={args.sft_steps}"] if args.sft_steps is not None else []
  overrides += [f"seed={args.seed}"] if args.seed is not None else []
  cfg = configs.apply_overrides(configs.get_config(args.config), overrides).validate()
  run_dir = args.run_dir or os.path.join("runs", cfg.name)
  tic = time.perf_counter()
  with MetricsLogger(run_dir) as logger:
    state = run_sft(cfg, run_dir, resume=args.resume, logger=logger)
    accuracy = evaluate(state.model, state.task, cfg.sft.eval_prompts, cfg.seed)
    logger.log(state.step, {"sft/accuracy": accuracy})
  summary = {"config": cfg.name, "steps": state.step, "final_loss": state.last_metrics.get("loss"),
             "accuracy": accuracy, "devices": jax.device_count(), "backend": jax.default_backend(),
             "seconds": time.perf_counter() - tic}
  print(f"sft: {state.step} steps, loss {summary['final_loss']}, greedy exact-match accuracy {accuracy:.3f}, "
        f"{summary['seconds']:.0f} s -> {write_summary(run_dir, summary)}")
  return state


if __name__ == "__main__":
  main(sys.argv[1:])
