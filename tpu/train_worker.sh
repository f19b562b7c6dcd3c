#!/usr/bin/env bash
# Runs on every TPU worker, started by `tpu.py launch` under nohup from the repository root:
# the trainer (--multihost: jax.distributed.initialize() finds the pod's other workers), then
# the marks `tpu.py watch` reads. Usage: tpu/train_worker.sh TRAIN_ARGS...
set -euo pipefail
logs="$HOME/kosmos-jax/logs"
# A SIGTERM (preemption notice, `tpu.py stop`) reaches this shell as well as the trainer. Bash
# runs the trap once the trainer has exited, so a clean exit after a SIGTERM (the trainer saves
# and exits 0) is told apart from the end of training.
trap 'touch "$logs/interrupted"' TERM
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) kosmos-jax train on $(hostname)"
status=0
"$HOME/kosmos-jax/venv/bin/kosmos-jax" train --multihost "$@" || status=$?
echo "$status" > "$logs/exit_status"
