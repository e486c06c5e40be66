#!/usr/bin/env bash
# The quickstart's GPUs are character devices with no driver behind them: the node
# agent's NVML finds nothing to sample and every job settles on held time ("not
# measured"). This script runs the unchanged `gpuledger agent`, with the node's own
# agent.toml, over the fake libnvidia-ml the tests use (tests/fakenvml/live.py: ctypes
# callbacks under the real nvidia-ml-py binding, matched to /dev/nvidiaN by minor
# number), in the place of the real agent, so that jobs are measured. A job sets the
# load of its GPU by appending lines to the GPU's control file (any local user may: a
# demo, not a measurement anyone should bill from):
#     <epoch ms> <utilization %> <power mW> <memory bytes>   >>  $FAKE_CONTROL/gpu<minor>
#
#   docs/quickstart-agent.sh start    stop the real agent (its systemd unit, or the
#                                     pidfile the Ansible role starts it with), start the
#                                     fake one and wait until it answers on its socket
#   docs/quickstart-agent.sh stop     stop the fake one; start the real agent again if
#                                     `start` stopped it
#   docs/quickstart-agent.sh status   say which agent runs
# Run as root. Environment (defaults):
#   GPULEDGER_VENV     /opt/gpuledger/venv   (the virtualenv the roles install)
#   AGENT_CONFIG       /etc/gpuledger/agent.toml
#   FAKE_GPUS          type:minor,...  (default: this node's GPUs in gres.conf; h100 or a100)
#   FAKE_CONTROL       /run/gpuledger-demo/gpus
#   FAKE_STATE         /run/gpuledger-demo   (the fake's pidfile, what `start` stopped)
#   FAKE_LOG           /var/log/gpuledger/demo-agent.log
#   REAL_AGENT         take-over | leave   (leave: never stop or start the real agent)
#   REAL_AGENT_UNIT    gpuledger-agent.service   (the real agent's unit under systemd)
#   REAL_AGENT_PIDFILE /run/gpuledger/agent.pid   (the roles' pidfile without systemd)
#   REAL_AGENT_LOG     /var/log/gpuledger/agent.log   (its log when started without systemd)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${GPULEDGER_VENV:-/opt/gpuledger/venv}
py=$venv/bin/python
config=${AGENT_CONFIG:-/etc/gpuledger/agent.toml}
control=${FAKE_CONTROL:-/run/gpuledger-demo/gpus}
state=${FAKE_STATE:-/run/gpuledger-demo}
log=${FAKE_LOG:-/var/log/gpuledger/demo-agent.log}
real=${REAL_AGENT:-take-over}
real_pidfile=${REAL_AGENT_PIDFILE:-/run/gpuledger/agent.pid}
unit=${REAL_AGENT_UNIT:-gpuledger-agent.service}
real_log=${REAL_AGENT_LOG:-/var/log/gpuledger/agent.log}
pidfile=$state/agent.pid
stopped=$state/real-agent-stopped
me=quickstart-agent

die() { echo "$me: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
[ -x "$py" ] || die "$py not found (set GPULEDGER_VENV)"
[ -f "$repo/tests/fakenvml/live.py" ] || die "$repo/tests/fakenvml/live.py not found"
case "$real" in take-over|leave) ;; *) die "REAL_AGENT is '$real', not take-over or leave" ;; esac

has_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

# pid of a live process from a pidfile whose command line contains $2, else nothing
live_pid() {
  local pid
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  case "$pid" in ''|*[!0-9]*) return 0 ;; esac
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2" && echo "$pid"
  return 0
}

# running, and not a zombie (whose command line is empty)
alive() { [ -n "$(tr -d '\0' < "/proc/$1/cmdline" 2>/dev/null)" ]; }

stop_pid() {  # TERM, then wait up to 15 s
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do
    alive "$pid" || return 0
    sleep 0.1
  done
  die "process $pid did not stop after SIGTERM"
}

agent_socket() {
  "$py" -c 'import sys
from slurm_plugin.agent.config import AgentConfig
print(AgentConfig.load(sys.argv[1] if sys.argv[1] else None).socket)' "$([ -f "$config" ] && echo "$config")"
}

# type:minor of each GPU gres.conf gives this node, as the agent itself reads it
gres_gpus() {
  "$py" -c 'import os, sys
from ledger.slurmsyntax import gres_conf, node_gpus
from slurm_plugin.agent.config import AgentConfig
cfg = AgentConfig.load(sys.argv[1] if sys.argv[1] else None)
try:
    text = open(cfg.gres_conf).read()
except OSError as exc:
    sys.exit(f"cannot read {cfg.gres_conf}: {exc}")
out = []
for gtype, files in node_gpus(gres_conf(text), cfg.node_name):
    try:
        minor = os.minor(os.stat(files[0]).st_rdev)
    except OSError as exc:
        sys.exit(f"GPU device {files[0]}: {exc}")
    kind = gtype if gtype in ("h100", "a100") else "h100"  # the fakes live.py knows
    out.append(f"{kind}:{minor}")
if not out:
    sys.exit(f"no GPUs for node {cfg.node_name} in {cfg.gres_conf}")
print(",".join(out))' "$([ -f "$config" ] && echo "$config")"
}

ping() {
  "$py" -c 'import sys
from slurm_plugin.agent import client
try:
    ok = client.request({"op": "ping"}, sys.argv[1], timeout=1).get("ok")
except client.AgentUnreachable:
    ok = False
sys.exit(0 if ok else 1)' "$1"
}

stop_real() {
  [ "$real" = take-over ] || return 0
  if has_systemd && systemctl is-active --quiet "$unit"; then
    systemctl stop "$unit"
    echo systemd > "$stopped"
    echo "stopped $unit"
    return 0
  fi
  local pid
  pid=$(live_pid "$real_pidfile" "gpuledger agent")
  if [ -n "$pid" ]; then
    stop_pid "$pid"
    rm -f "$real_pidfile"
    echo direct > "$stopped"
    echo "stopped the agent of $real_pidfile (pid $pid)"
  fi
}

start_real() {
  [ -f "$stopped" ] || return 0
  case "$(cat "$stopped")" in
    systemd)
      systemctl start "$unit"
      echo "started $unit again" ;;
    direct)
      local pid sock
      sock=$(agent_socket) || die "cannot read $config"
      mkdir -p "$(dirname "$real_pidfile")" "$(dirname "$real_log")"
      nohup setsid "$venv/bin/gpuledger" agent --config "$config" \
        >> "$real_log" 2>&1 < /dev/null &
      pid=$!
      echo "$pid" > "$real_pidfile"
      rm -f "$stopped"
      for _ in $(seq 1 300); do
        if ping "$sock"; then
          echo "started the real agent again (pid $pid, $real_pidfile)"
          return 0
        fi
        alive "$pid" || break
        sleep 0.1
      done
      echo "$me: the real agent did not come back on $sock; the end of $real_log:" >&2
      tail -n 20 "$real_log" >&2
      exit 1 ;;
  esac
  rm -f "$stopped"
}

start() {
  local pid gpus sock
  mkdir -p "$state"
  chmod 0755 "$state"
  pid=$(live_pid "$pidfile" tests/fakenvml/live.py)
  if [ -n "$pid" ]; then
    echo "fake-NVML agent already running (pid $pid)"
    return 0
  fi
  gpus=${FAKE_GPUS:-$(gres_gpus)} || die "cannot list this node's GPUs (set FAKE_GPUS)"
  sock=$(agent_socket) || die "cannot read $config"
  mkdir -p "$control" "$(dirname "$log")"
  chmod 0755 "$control"
  local item
  for item in ${gpus//,/ }; do  # the job (its user) appends to its GPU's file
    touch "$control/gpu${item#*:}"
    chmod 0666 "$control/gpu${item#*:}"
  done
  stop_real
  [ -f "$config" ] && set -- --config "$config" || set --
  nohup setsid "$py" "$repo/tests/fakenvml/live.py" --control "$control" --gpus "$gpus" \
    -- "$@" >> "$log" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$pidfile"
  for _ in $(seq 1 300); do
    if ping "$sock"; then
      echo "fake-NVML agent up: pid $pid, socket $sock, GPUs $gpus, control files $control/gpu<minor>, log $log"
      return 0
    fi
    if ! alive "$pid"; then
      echo "$me: the fake-NVML agent exited; the end of $log:" >&2
      tail -n 20 "$log" >&2
      rm -f "$pidfile"
      start_real
      exit 1
    fi
    sleep 0.1
  done
  stop_pid "$pid"
  rm -f "$pidfile"
  start_real
  die "the fake-NVML agent did not answer on $sock within 30 s (see $log)"
}

stop() {
  local pid
  pid=$(live_pid "$pidfile" tests/fakenvml/live.py)
  if [ -n "$pid" ]; then
    stop_pid "$pid"
    echo "stopped the fake-NVML agent (pid $pid)"
  fi
  rm -f "$pidfile"
  start_real
}

status() {
  local pid
  pid=$(live_pid "$pidfile" tests/fakenvml/live.py)
  if [ -n "$pid" ]; then
    echo "fake-NVML agent running (pid $pid)"
  else
    echo "fake-NVML agent not running"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
