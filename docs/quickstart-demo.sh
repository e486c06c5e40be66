#!/usr/bin/env bash
# gpuledger end to end on the one-node lab cluster, after ansible/single-node.yml
# has run with the gpuledger roles (see ansible/README.md): create an account,
# mint a token for alice into a 0600 file she owns, submit a GPU job as alice with
# `sbatch --gpu-token=@FILE`, wait for it, print its settlement receipt and render
# the account's report for this month. Run as root. Safe to run again (each run
# mints a new token and submits a new job).
#
# The measured path: the lab's GPUs are character devices with no driver, so the node
# agent's NVML has nothing to sample. Unless a real NVML answers, the demo runs the
# unchanged `gpuledger agent` over the fake libnvidia-ml of the tests in its place
# (docs/quickstart-agent.sh; the real agent is started again when the demo ends). The
# job tells its fake GPU how busy it is (90 % for 6 s, then idle) and the receipt and
# the report show the busy time, the efficiency and the energy the agent measured.
# Environment (defaults):
#   GPULEDGER          /opt/gpuledger/venv/bin/gpuledger
#   DEMO_ACCOUNT       physics      (a Slurm account alice belongs to)
#   DEMO_USER          alice
#   DEMO_HOURS         10           (face value of the token, GPU-hours)
#   DEMO_GRES          gpu:h100:1
#   DEMO_TIME          5            (job time limit, minutes)
#   DEMO_WAIT          180          (seconds to wait for the job to finish)
#   DEMO_FAKE_NVML     auto         (auto: the fake GPUs unless NVML initializes; yes; no)
#   DEMO_KEEP_AGENT    0            (1: leave the fake-NVML agent running after the demo)
set -euo pipefail
gl=${GPULEDGER:-/opt/gpuledger/venv/bin/gpuledger}
account=${DEMO_ACCOUNT:-physics}
user=${DEMO_USER:-alice}
hours=${DEMO_HOURS:-10}
gres=${DEMO_GRES:-gpu:h100:1}
minutes=${DEMO_TIME:-5}
wait_s=${DEMO_WAIT:-180}
fake_nvml=${DEMO_FAKE_NVML:-auto}
keep_agent=${DEMO_KEEP_AGENT:-0}
month=$(date -u +%Y-%m)
here=$(cd "$(dirname "$0")" && pwd)
venv=$(dirname "$(dirname "$gl")")
control=${FAKE_CONTROL:-/run/gpuledger-demo/gpus}

[ "$(id -u)" = 0 ] || { echo "quickstart-demo: run as root" >&2; exit 1; }
[ -x "$gl" ] || { echo "quickstart-demo: $gl not found (run ansible/single-node.yml with the gpuledger roles first)" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }

# The measured path: a real NVML, else the agent over fake GPUs (see the top).
case "$fake_nvml" in
  auto)
    if "$venv/bin/python" -c 'import pynvml; pynvml.nvmlInit(); pynvml.nvmlShutdown()' 2>/dev/null; then
      fake_nvml=no
    else
      fake_nvml=yes
    fi ;;
  yes|no) ;;
  *) echo "quickstart-demo: DEMO_FAKE_NVML is '$fake_nvml', not auto, yes or no" >&2; exit 1 ;;
esac
if [ "$fake_nvml" = yes ]; then
  step "Node agent over fake GPUs (no NVIDIA driver here): docs/quickstart-agent.sh start"
  GPULEDGER_VENV=$venv FAKE_CONTROL=$control "$here/quickstart-agent.sh" start
  if [ "$keep_agent" != 1 ]; then
    trap 'GPULEDGER_VENV=$venv FAKE_CONTROL=$control "$here/quickstart-agent.sh" stop' EXIT
  fi
fi

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
# The job's first GPU: 90 % busy for 6 s at 550 W with 40 GiB in use, then idle for 2 s.
# On the fake GPUs the job says so in its GPU's control file (Slurm's GPU index is the
# device minor in the lab's gres.conf); on real GPUs the lines go nowhere and NVML sees
# whatever the job does.
job=$(cd "$workdir" && runuser -u "$user" -- sbatch --parsable -A "$account" \
  --gpu-token="@$token_file" --gres="$gres" -t "$minutes" -J gpuledger-demo \
  -o "$workdir/slurm-%j.out" \
  --wrap 'g=${SLURM_JOB_GPUS%%,*}; f='"$control"'/gpu$g
load() { if [ -w "$f" ]; then echo "$(date +%s%3N) $1 $2 $3" >> "$f"; fi; }
echo "job $SLURM_JOB_ID on $(hostname -s): GPUs $CUDA_VISIBLE_DEVICES"
load 90 550000 42949672960; sleep 6; load 0 70000 0; sleep 2')
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
if [ "$fake_nvml" = yes ] && ! "$gl" job show "$job" --json | python3 -c 'import json, sys
sys.exit(0 if all(h["efficiency"] is not None for h in json.load(sys.stdin)["holds"]) else 1)'; then
  echo "quickstart-demo: job $job settled on held time: the agent did not measure it" \
    "(see /var/log/gpuledger/demo-agent.log and /var/log/gpuledger/hooks.log)" >&2
  exit 1
fi

step "Report for $account, $month"
"$gl" report render --month "$month" --account "$account" --format text
