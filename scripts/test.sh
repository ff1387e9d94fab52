#!/usr/bin/env bash
# The project's test command (README): CPU with 8 virtual devices; GPU-only tests skip themselves.
set -euo pipefail
# Serial collectives on CPU: with more virtual devices than cores, concurrently scheduled collectives
# of independent ppermute rounds can deadlock.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
ruff check --quiet "$(dirname "$0")/.."  # lint first: seconds, before minutes of tests
exec python3 -m pytest -q -x --durations=15 "$@"
