"""``gpuledger serve`` and the user commands that talk to it: balance, quote, jobs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..amounts import fmt_duration, fmt_hours, fmt_rate
from ..cli.context import echo_fields, echo_json, echo_table, pass_app, read_token_arg
from ..errors import InvalidInput
from ..slurmsyntax import array_size, parse_gpus, parse_gres, time_limit_seconds
from .client import connect, response_error

socket_option = click.option("--socket", "socket_path", envvar="GPULEDGER_SOCKET",
                             help="Daemon socket (default: config, else "
                                  "/run/gpuledger/gpuledger.sock).")


@click.command("serve")
@click.option("--socket", "socket_path", help="Socket path (default: [daemon] socket).")
@click.option("--socket-group", help="Group owning the socket (default: [daemon] socket_group).")
@click.option("--inherited-fd", type=int, hidden=True,
              help="Internal: serve this already bound socket as the users' process.")
@click.option("--inherited-metrics-fd", type=int, hidden=True,
              help="Internal: serve the metrics endpoint on this already bound socket.")
@pass_app
def serve(app, socket_path, socket_group, inherited_fd, inherited_metrics_fd):
    """Run the ledger daemon on its Unix socket (foreground; systemd runs this).

    With [daemon] privileged_socket set, this process serves that socket (root and the
    SlurmUser only) and starts a second, lower-priority process for the main socket; that
    one also serves the metrics endpoint ([metrics] listen)."""
    import socket as socket_mod

    from .auth import Policy, SlurmAccounts
    from .endpoint import bind_or_log, start
    from .handlers import Handlers
    from .instruments import Instruments
    from .processes import TwoProcesses, as_users_process
    from .server import RequestLog, Server, tune_threads

    from .. import logformat

    logformat.setup("ts=%(asctime)s level=%(levelname)s %(message)s")  # the ledger's own log
    cfg = app.config
    ledger = app.ledger
    ledger.reload_keys()  # fail early on an unreachable database
    policy = Policy(cfg.daemon.slurm_user)
    path = socket_path or cfg.daemon.socket

    fast = None
    if cfg.daemon.fast_reserve and inherited_fd is None:  # the process slurmctld talks to
        from .fastpath import FastReserve
        from .writer import ProcessWriter

        fast = FastReserve(ledger, fresh_s=cfg.daemon.fast_reserve_fresh_s,
                           delay_s=cfg.daemon.fast_reserve_batch_ms / 1000,
                           writer=ProcessWriter(app.config_path))
        fast.start()
    instruments = Instruments()  # this process's counters, shared by its servers
    instruments.fast = fast

    def server(where, **kw) -> Server:
        return Server(Handlers(ledger, policy, SlurmAccounts(), fast=fast, charge=cfg.charge,
                               instruments=instruments), where,
                      max_line=cfg.daemon.max_line, log=RequestLog(), instruments=instruments,
                      **kw)

    public = server(path, group=socket_group or cfg.daemon.socket_group)
    endpoint = None
    door = None
    if cfg.daemon.node_listen and inherited_fd is None:  # the privileged process serves nodes
        from .nodedoor import NodeDoor

        door = NodeDoor(public.handlers, cfg.daemon.node_listen,
                        check_address=cfg.daemon.node_check_address, log=public.log)
        door.bind()
    if inherited_fd is not None:
        as_users_process()
        public.adopt(inherited_fd)
        runner = public
        if inherited_metrics_fd is not None:
            endpoint = start(cfg, ledger, instruments, "users", public.log,
                             socket_mod.socket(fileno=inherited_metrics_fd),
                             peer_socket=cfg.daemon.privileged_socket)
    elif cfg.daemon.privileged_socket:
        runner = TwoProcesses(server(cfg.daemon.privileged_socket, privileged_only=True),
                              public, app.config_path)
        runner.bind()
        # bound here, served by the users' process (it outlives a restart of that process)
        runner.metrics_listener = bind_or_log(cfg, public.log)
    else:
        public.bind()
        runner = public
        listener = bind_or_log(cfg, public.log)
        if listener is not None:
            endpoint = start(cfg, ledger, instruments, "main", public.log, listener)
    if inherited_fd is None:  # the users' process just ends on SIGTERM (from its parent)
        install_signal_handlers(runner, public.log)
    tune_threads()
    if door is not None:
        door.start()
    try:
        runner.serve_forever()
    finally:
        if door is not None:
            door.stop()
        runner.stop()
        if endpoint is not None:
            endpoint.stop()
        if fast is not None:
            fast.stop()  # write what was answered before exiting
        if inherited_fd is None:
            public.log.event(event="stopped", pid=os.getpid())


def install_signal_handlers(runner, log) -> None:
    import signal
    import threading

    def on_signal(signum, _frame):
        log.event(event="stopping", signal=signal.Signals(signum).name, pid=os.getpid())
        threading.Thread(target=runner.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _token_arg(value: str | None) -> str | None:
    """``--token`` (TOKEN or @FILE), else $GPU_TOKEN, else ~/.config/gpuledger/token."""
    if value:
        return read_token_arg(value)
    if os.environ.get("GPU_TOKEN"):
        return read_token_arg(os.environ["GPU_TOKEN"])
    default = Path.home() / ".config" / "gpuledger" / "token"
    if default.is_file():
        return read_token_arg(f"@{default}")
    return None


@click.command("balance")
@socket_option
@click.option("--user", help="Another user (root and the Slurm user only).")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def balance(app, socket_path, user, as_json):
    """Your tokens and your Slurm accounts' balances."""
    with connect(socket_path, app.config_path) as client:
        data = client.request("balance", user=user)
    if as_json:
        return echo_json(data)
    click.echo(f"user {data['user']}; Slurm accounts: {', '.join(data['slurm_accounts']) or '-'}")
    echo_table(["TOKEN", "ACCOUNT", "STATUS", "REMAINING GPU-H", "HELD", "EXPIRES", "SCOPES"],
               [[t["id"], t["account"], t["status"], fmt_hours(t["remaining"]),
                 fmt_hours(t["held"]), t["expires"],
                 "; ".join(f"{k}={','.join(v)}" for k, v in t["scopes"].items()) or "any"]
                for t in data["tokens"]])
    if data["accounts"]:
        click.echo("")
        echo_table(["ACCOUNT", "TOKENS", "REMAINING GPU-H", "HELD", "POOL"],
                   [[a["name"], a["tokens"], fmt_hours(a["remaining"]), fmt_hours(a["held"]),
                     fmt_hours(a["pool"])] for a in data["accounts"]])


@click.command("quote")
@socket_option
@click.option("--gres", help="As sbatch, per node: gpu[:TYPE][:COUNT], shard[:TYPE]:COUNT "
              "or mps[:TYPE]:PERCENT.")
@click.option("--gpus", "-G", "gpus", help="As sbatch: [TYPE:]COUNT for the whole job.")
@click.option("--gpus-per-node", help="[TYPE:]COUNT per node.")
@click.option("--nodes", "-N", type=int, default=1, show_default=True)
@click.option("--time", "-t", "time_limit", required=True, help="Time limit, Slurm syntax.")
@click.option("--array", "array", help="Array spec, e.g. 0-9.")
@click.option("--account", "-A")
@click.option("--partition", "-p")
@click.option("--qos", "-q", help="The job's QOS (tier multipliers by QOS).")
@click.option("--token", help="TOKEN or @FILE (default: $GPU_TOKEN, ~/.config/gpuledger/token).")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def quote(app, socket_path, gres, gpus, gpus_per_node, nodes, time_limit, array, account,
          partition, qos, token, as_json):
    """What a job would hold, and whether the token covers it."""
    count, gpu_type, kind, per_node = 0, None, "gpu", None
    if gres:
        count, gpu_type, kind = parse_gres(gres)
        per_node = count if kind != "gpu" else None
        count *= nodes
    elif gpus_per_node:
        per, gpu_type = parse_gpus(gpus_per_node)
        count = per * nodes
    elif gpus:
        count, gpu_type = parse_gpus(gpus)
    if count <= 0:
        raise InvalidInput("say how many GPUs: --gres=gpu:h100:4, --gpus=4 or --gpus-per-node=2")
    seconds = time_limit_seconds(time_limit)
    tasks = array_size(array) if array else 1
    with connect(socket_path, app.config_path) as client:
        resp = client.call("quote", gpus=count, seconds=seconds, type=gpu_type, tasks=tasks,
                           account=account, partition=partition, qos=qos,
                           token=_token_arg(token),
                           **({"gres": kind, "per_node": per_node} if kind != "gpu" else {}))
    if as_json:
        return echo_json(resp)
    if "amount" not in resp:
        raise response_error(resp)
    pairs = [("request", resp["desc"]), ("would hold", f"{resp['hours']} GPU-h")]
    if kind != "gpu":
        pairs.append(("priced as", f"{per_node} of {resp['share']} {kind}s of a GPU "
                                   f"at rate {fmt_rate(int(resp['rate']))}"))
    if resp.get("multiplier") not in (None, "1000000") or resp.get("cheapest"):
        pairs.append(("tier multiplier", fmt_rate(int(resp["multiplier"]))))
    if resp.get("cheapest"):
        pairs.append(("cheapest tier", f"{resp['cheapest']} "
                      f"(x{fmt_rate(int(resp['cheapest_multiplier_ppm']))}): "
                      f"{fmt_hours(int(resp['cheapest_amount']))} GPU-h"))
    if resp.get("ok") != "1":
        pairs.append(("token", resp.get("token_id") or "-"))
        pairs.append(("covers", f"no: {resp.get('message')}"))
        echo_fields(pairs)
        raise SystemExit(1)
    if resp.get("token_id"):
        covers = resp.get("covers") == "1"
        pairs += [("token", resp["token_id"]), ("status", resp["status"]),
                  ("remaining", f"{resp['remaining_hours']} GPU-h"),
                  ("covers", "yes" if covers else "no")]
        echo_fields(pairs)
        if not covers:
            raise SystemExit(1)
        return
    echo_fields(pairs + [("time limit", fmt_duration(seconds))])


@click.command("jobs")
@socket_option
@click.option("--state", type=click.Choice(["pending", "posted", "voided"]))
@click.option("--user", help="Another user (root and the Slurm user only).")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_app
def jobs(app, socket_path, state, user, as_json):
    """Your jobs' holds: what each held, charged and returned."""
    with connect(socket_path, app.config_path) as client:
        data = client.request("jobs", user=user, state=state)
    if as_json:
        return echo_json(data)
    echo_table(["HOLD", "JOB", "STATE", "TOKEN", "REQUEST", "HELD GPU-H", "CHARGED", "RETURNED"],
               [[h["id"], h["job_id"], h["state"], h["token_id"],
                 f"{h['gpus']} x {h['gpu_type'] or 'gpu'} x {fmt_duration(h['seconds'])}"
                 + (f" x {h['tasks']}" if h["tasks"] > 1 else ""),
                 fmt_hours(h["amount"]), fmt_hours(h["charged"]), fmt_hours(h["returned"])]
                for h in data["holds"]])


COMMANDS = [serve, balance, quote, jobs]
