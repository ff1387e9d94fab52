#!/usr/bin/env bash
# The project's test command (README): CPU with 8 virtual devices; GPU-only tests skip themselves.
set -euo pipefail
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python3 -m pytest -q -x --durations=15 "$@"
