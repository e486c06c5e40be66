#!/usr/bin/env bash
# Quickstart, as root on a fresh Debian 12/13 machine: a one-node Slurm cluster
# with gpuledger on the embedded SQLite ledger (ansible/single-node.yml on
# localhost), then a token-paid GPU job end to end (docs/quickstart-demo.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "quickstart: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! command -v ansible-playbook >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ansible-core python3-venv >/dev/null
fi
ANSIBLE_LOCALHOST_WARNING=false ANSIBLE_INVENTORY_UNPARSED_WARNING=false ANSIBLE_PYTHON_INTERPRETER=auto_silent \
  ansible-playbook -i localhost, -c local "$repo/ansible/single-node.yml"
node=$(hostname -s)
for _ in $(seq 1 90); do
  case "$(sinfo -h -n "$node" -o %t 2>/dev/null | head -n1)" in idle|mix|alloc) break ;; esac
  sleep 1
done
exec "$repo/docs/quickstart-demo.sh"
