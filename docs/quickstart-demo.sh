#!/usr/bin/env bash
# gpuledger end to end on the one-node lab cluster, after ansible/single-node.yml
# has run with the gpuledger roles (see ansible/README.md): create an account,
# mint a token for alice into a 0600 file she owns, submit a GPU job as alice with
# `sbatch --gpu-token=@FILE`, wait for it, print its settlement receipt and render
# the account's report for this month. Run as root. Safe to run again (each run
# mints a new token and submits a new job).
# Environment (defaults):
#   GPULEDGER          /opt/gpuledger/venv/bin/gpuledger
#   DEMO_ACCOUNT       physics      (a Slurm account alice belongs to)
#   DEMO_USER          alice
#   DEMO_HOURS         10           (face value of the token, GPU-hours)
#   DEMO_GRES          gpu:h100:1
#   DEMO_TIME          5            (job time limit, minutes)
#   DEMO_WAIT          180          (seconds to wait for the job to finish)
set -euo pipefail
gl=${GPULEDGER:-/opt/gpuledger/venv/bin/gpuledger}
account=${DEMO_ACCOUNT:-physics}
user=${DEMO_USER:-alice}
hours=${DEMO_HOURS:-10}
gres=${DEMO_GRES:-gpu:h100:1}
minutes=${DEMO_TIME:-5}
wait_s=${DEMO_WAIT:-180}
month=$(date -u +%Y-%m)

[ "$(id -u)" = 0 ] || { echo "quickstart-demo: run as root" >&2; exit 1; }
[ -x "$gl" ] || { echo "quickstart-demo: $gl not found (run ansible/single-node.yml with the gpuledger roles first)" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }

step "Account $account"
if "$gl" account list --json | python3 -c 'import json, sys; sys.exit(0 if any(a["name"] == sys.argv[1] for a in json.load(sys.stdin)) else 1)' "$account"; then
  echo "Account $account exists"
else
  "$gl" account create "$account"
fi

step "Token for $user: $hours GPU-h on $account"
home=$(getent passwd "$user" | cut -d: -f6)
[ -n "$home" ] && [ -d "$home" ] || { echo "quickstart-demo: user $user has no home directory" >&2; exit 1; }
token_file=$home/.gpu-token
"$gl" token mint --account "$account" --hours "$hours" --users "$user" --out "$token_file"
chown "$user:" "$token_file"
chmod 0600 "$token_file"
ls -l "$token_file"

step "GPU job as $user: sbatch --gpu-token=@$token_file --gres=$gres -t $minutes"
workdir=$(runuser -u "$user" -- mktemp -d /tmp/gpuledger-demo.XXXXXX)
job=$(cd "$workdir" && runuser -u "$user" -- sbatch --parsable -A "$account" \
  --gpu-token="@$token_file" --gres="$gres" -t "$minutes" -J gpuledger-demo \
  -o "$workdir/slurm-%j.out" \
  --wrap 'echo "job $SLURM_JOB_ID on $(hostname -s): GPUs $CUDA_VISIBLE_DEVICES"; sleep 5')
job=${job%%;*}
echo "Submitted job $job"
# Slurm read as data (squeue --json), as the hooks read it: a job name cannot fake a field
job_field() {
  squeue --json --all --states all --jobs "$1" 2>/dev/null | python3 -c '
import json, sys
want, key = sys.argv[1], sys.argv[2]
for j in json.load(sys.stdin)["jobs"]:
    if str(j["job_id"]) == want:
        v = j[key]
        print(v[0] if isinstance(v, list) else v)
' "$1" "$2" 2>/dev/null || true
}
echo "AdminComment=$(job_field "$job" admin_comment)"

step "Waiting for job $job"
state=
for _ in $(seq 1 "$wait_s"); do
  state=$(job_field "$job" job_state)
  [ -z "$state" ] && state=$(sacct -n -X -P -j "$job" -o State 2>/dev/null | head -n1 | cut -d' ' -f1)
  case "$state" in
    COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) break ;;
  esac
  sleep 1
done
echo "Job $job: ${state:-unknown}"
cat "$workdir"/slurm-"$job".out 2>/dev/null || true
case "$state" in COMPLETED) ;; *) echo "quickstart-demo: job $job did not complete" >&2; exit 1 ;; esac

step "Settlement receipt (gpuledger job show $job)"
# The node epilog charges as the job completes and EpilogSlurmctld closes the hold once
# every node has charged: wait for the hold to be closed, and fail if it never is.
settled=
for _ in $(seq 1 60); do
  if "$gl" job show "$job" --json 2>/dev/null | python3 -c 'import json, sys
holds = json.load(sys.stdin)["holds"]
sys.exit(0 if holds and all(h["state"] == "posted" and h["charged"] > 0 for h in holds) else 1)'; then
    settled=1
    break
  fi
  sleep 1
done
"$gl" job show "$job"
[ -n "$settled" ] || { echo "quickstart-demo: job $job was not settled (see /var/log/gpuledger/hooks.log)" >&2; exit 1; }

step "Report for $account, $month"
"$gl" report render --month "$month" --account "$account" --format text
