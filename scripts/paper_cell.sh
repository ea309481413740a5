#!/usr/bin/env bash
# Sample and score one cell of the Epsilon Scaling paper's ADM table.
#   scripts/paper_cell.sh CONFIG STEPS {base|es|es-linear} [NUM_GPUS] [--dry-run]
# e.g. scripts/paper_cell.sh cifar10_uncond_admes 100 es 8      (FID 2.17 in the paper)
#      scripts/paper_cell.sh imagenet64_cond 20 base 4 --dry-run
# WORK_DIR (default runs/) holds checkpoints, reference batches and samples.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
args=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then dry_run=1; else args+=("$a"); fi
done
if [ "${#args[@]}" -lt 3 ]; then
  echo "usage: $0 CONFIG STEPS {base|es|es-linear} [NUM_GPUS] [--dry-run]" >&2
  exit 2
fi
commands=$(python scripts/paper_commands.py "${args[0]}" "${args[1]}" "${args[2]}" \
  --num_gpus "${args[3]:-1}" --work_dir "${WORK_DIR:-runs}")
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "$commands"
  exit 0
fi
while IFS= read -r command; do
  echo "+ $command" >&2
  bash -c "$command" </dev/null  # mpirun reads stdin: it must not take the remaining commands
done <<< "$commands"
