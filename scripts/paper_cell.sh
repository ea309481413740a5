#!/usr/bin/env bash
# Sample and score one cell of the Epsilon Scaling paper's ADM table.
#   scripts/paper_cell.sh CONFIG STEPS {base|es|es-linear} [NUM_GPUS] [--seed_sets N] [--dry-run]
# e.g. scripts/paper_cell.sh cifar10_uncond_admes 100 es 8      (FID 2.17 in the paper)
#      scripts/paper_cell.sh imagenet64_cond 20 base 4 --dry-run
#      scripts/paper_cell.sh lsun_tower64_admes 50 es 8 --seed_sets 3   (seeds 0, 1, 2; one evaluator call)
# WORK_DIR holds checkpoints, reference batches and samples: by default runs/ in the checkout; a
# relative WORK_DIR is taken from the folder you run this from. Any folder name works (spaces,
# quotes). Each command is shown on stdout ("+ ...") before it runs; a failure (a missing download
# when offline, a wrong argument) ends in one "error: ..." line on stderr and exit status 2.
set -euo pipefail
usage="scripts/paper_cell.sh CONFIG STEPS {base|es|es-linear} [NUM_GPUS] [--seed_sets N] [--dry-run]"
dry_run=0
seed_sets=1
args=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --seed_sets=*) seed_sets=${1#--seed_sets=} ;;
    --seed_sets)
      if [ "$#" -lt 2 ]; then echo "error: --seed_sets needs a number (usage: $usage)" >&2; exit 2; fi
      seed_sets=$2; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [ "${#args[@]}" -lt 3 ] || [ "${#args[@]}" -gt 4 ]; then
  echo "error: expected CONFIG STEPS VARIANT [NUM_GPUS], got ${#args[@]} arguments (usage: $usage)" >&2
  exit 2
fi
work_dir=${WORK_DIR:-}
if [ -n "$work_dir" ] && [ "${work_dir#/}" = "$work_dir" ]; then
  work_dir="$PWD/$work_dir"
fi
cd "$(dirname "$0")/.."
commands=$(python scripts/paper_commands.py "${args[0]}" "${args[1]}" "${args[2]}" \
  --num_gpus "${args[3]:-1}" --work_dir "${work_dir:-runs}" --seed_sets "$seed_sets")
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "$commands"
  exit 0
fi
while IFS= read -r command; do
  printf '+ %s\n' "$command"
  bash -c "$command" </dev/null  # mpirun reads stdin: it must not take the remaining commands
done <<< "$commands"
