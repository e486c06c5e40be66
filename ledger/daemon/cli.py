"""``gpuledger serve`` and the user commands that talk to it: balance, quote, jobs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..amounts import fmt_duration, fmt_hours, fmt_rate, hours
from ..cli import objects
from ..cli.context import pass_app, read_token_arg
from ..cli.output import (
    echo_fields,
    echo_json,
    echo_table,
    json_output,
    no_json,
    ppm_number,
    table_output,
)
from ..cli.shapes import obj
from ..errors import InvalidInput, Refusal
from ..jobrequest import SlurmJob, asks_gpu
from ..slurmsyntax import time_limit_seconds
from .client import connect, response_error

MEMBER_ACCOUNT = obj("member-account", "An account as its members see it (no pool: that "
                                        "is the admins').", [
    ("name", "string", "Slurm account"),
    ("tokens", "integer", "tokens it holds"),
    ("remaining", "integer", f"sum of its tokens' remaining, {objects.AMOUNT}"),
    ("held", "integer", f"sum held for pending jobs, {objects.AMOUNT}"),
    ("remaining_hours", "number", "remaining in GPU-hours"),
    ("held_hours", "number", "held in GPU-hours"),
])
BALANCE = obj("balance", "A user's tokens and Slurm accounts.", [
    ("user", "string", "the user"),
    ("slurm_accounts", "list of string", "their Slurm accounts"),
    ("accounts", "list of member-account", "those accounts known to the ledger"),
    ("tokens", "list of token", "tokens scoped to the user or to those accounts"),
])
JOBS = obj("jobs", "A user's holds.", [
    ("user", "string", "the user"),
    ("holds", "list of hold", "their holds, oldest first"),
])
QUOTE = obj("quote", "What a job would hold, and whether the token covers it (exit status 1 "
                     "when it does not).", [
    ("ok", "boolean", ("true: priced (a request that cannot be priced prints a "
                      "[refusal](#refusal) instead)")),
    ("free", "boolean", ("the account is free ([submit] free_accounts): it holds nothing and "
                         "needs no token (the price fields are null)")),
    ("request", "string", "the request in words (`2 x h100 x 4:00:00`)"),
    ("user", "string", "whose job"),
    ("amount", "integer", f"what it would hold, {objects.AMOUNT}"),
    ("hours", "number", "the same in GPU-hours"),
    ("rate", "number?", "the rate it is priced at"),
    ("rate_ppm", "integer?", "the same in parts per million"),
    ("share", "integer?", "shares per GPU it is priced at (1: whole GPUs)"),
    ("multiplier", "number?", "the tier multiplier it is held at"),
    ("multiplier_ppm", "integer?", "the same in parts per million"),
    ("cheapest", "string?", "a cheaper tier (`partition scavenger`), if any"),
    ("cheapest_multiplier_ppm", "integer?", "its multiplier"),
    ("cheapest_amount", "integer?", f"what it would hold there, {objects.AMOUNT}"),
    ("token_id", "string?", "the token checked (null: none given)"),
    ("status", "string?", "its status"),
    ("remaining", "integer?", f"what it has left, {objects.AMOUNT}"),
    ("remaining_hours", "number?", "the same in GPU-hours"),
    ("covers", "boolean?", ("whether it would pay (null: no token given); false: exit status 1, "
                           "`message` on the `Error:` line")),
    ("reason", "string?", ("why not (the [refusal](#refusal) reasons: insufficient, revoked, "
                          "wrong_partition, …)")),
    ("message", "string?", "why not, and what would fit (the words sbatch would refuse with)"),
])

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
@no_json("runs the daemon in the foreground")
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
                               instruments=instruments,
                               free_accounts=cfg.submit.free_accounts), where,
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
@json_output(BALANCE)
@table_output
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
        echo_table(["ACCOUNT", "TOKENS", "REMAINING GPU-H", "HELD"],
                   [[a["name"], a["tokens"], fmt_hours(a["remaining"]), fmt_hours(a["held"])]
                    for a in data["accounts"]])


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
@json_output(QUOTE)
@pass_app
def quote(app, socket_path, gres, gpus, gpus_per_node, nodes, time_limit, array, account,
          partition, qos, token, as_json):
    """What a job would hold, and whether the token covers it.

    The options become the request fields sbatch gives Slurm, and the daemon reads them
    with the job-request reader that job_submit uses (ledger/jobrequest.py)."""
    job = {"tres_per_node": ",".join(
               [*([gres] if gres else []),
                *([f"gres/gpu:{gpus_per_node}"] if gpus_per_node else [])]) or None,
           "tres_per_job": f"gres/gpu:{gpus}" if gpus else None,
           "min_nodes": nodes, "max_nodes": nodes,
           "time_limit": time_limit_seconds(time_limit) // 60, "array_inx": array}
    if not asks_gpu(SlurmJob(**job)):
        raise InvalidInput((f"--gres={gres} asks for no GPU (gpu, shard or mps); " if gres else "")
                           + "say how many GPUs: --gres=gpu:h100:4, --gpus=4 or "
                           "--gpus-per-node=2")
    with connect(socket_path, app.config_path) as client:
        resp = client.call("quote", **job, account=account, partition=partition, qos=qos,
                           token=_token_arg(token))
    if resp.get("result") == "free":
        data = free_json(resp, account)
        return echo_json(data) if as_json else echo_fields(
            [("request", data["request"]), ("would hold", "0.000 GPU-h")])
    if "desc" not in resp:  # refused before it was priced (no rate for its GPU type, ...)
        error = response_error(resp)
        if as_json and isinstance(error, Refusal):
            echo_json(_refusal_json(resp))
        raise error
    data = quote_json(resp)
    if as_json:
        echo_json(data)
    else:
        _show_quote(data, resp.get("gres") or "gpu", resp.get("per_node"), int(resp["seconds"]))
    if data["covers"] is False:  # the Error: line says why and what would fit; exit 1
        raise response_error({**resp, "ok": "0"})


def _refusal_json(resp: dict[str, str]) -> dict:
    return {"ok": False, "reason": resp.get("reason", "error"),
            "message": resp.get("message", ""), "token_id": resp.get("token_id") or None,
            "needed": _int(resp.get("needed")), "available": _int(resp.get("available"))}


def _int(text: str | None) -> int | None:
    return int(text) if text not in (None, "") else None


def free_json(resp: dict[str, str], account: str | None) -> dict:
    """A job of a free account ([submit] free_accounts): it holds nothing, needs no token."""
    return {"ok": True, "free": True, "user": resp.get("user", ""),
            "request": f"account {account} is free: its GPU jobs need no token",
            "amount": 0, "hours": 0.0, **dict.fromkeys((
                "rate", "rate_ppm", "share", "multiplier", "multiplier_ppm", "cheapest",
                "cheapest_multiplier_ppm", "cheapest_amount", "token_id", "status", "remaining",
                "remaining_hours", "covers", "reason", "message"))}


def quote_json(resp: dict[str, str]) -> dict:
    """The daemon's quote (text fields on the wire) as typed JSON (the ``quote`` object)."""
    rate, mult = _int(resp.get("rate")), _int(resp.get("multiplier"))
    amount, remaining = _int(resp.get("amount")), _int(resp.get("remaining"))
    token = resp.get("token_id") or None
    covers = resp.get("ok") == "1" and resp.get("covers") == "1"
    why = (lambda k: None) if covers or not token else resp.get
    return {"ok": True, "free": False, "request": resp["desc"], "user": resp.get("user", ""),
            "amount": amount, "hours": hours(amount), "rate": ppm_number(rate), "rate_ppm": rate,
            "share": _int(resp.get("share")) or 1, "multiplier": ppm_number(mult),
            "multiplier_ppm": mult, "cheapest": resp.get("cheapest") or None,
            "cheapest_multiplier_ppm": _int(resp.get("cheapest_multiplier_ppm")),
            "cheapest_amount": _int(resp.get("cheapest_amount")), "token_id": token,
            "status": resp.get("status") or None, "remaining": remaining,
            "remaining_hours": hours(remaining) if remaining is not None else None,
            "covers": covers if token else None, "reason": why("reason"),
            "message": why("message")}


def _show_quote(data: dict, kind: str, per_node, seconds: int) -> None:
    pairs = [("request", data["request"]), ("would hold", f"{fmt_hours(data['amount'])} GPU-h")]
    if kind != "gpu":
        pairs.append(("priced as", (f"{per_node} of {data['share']} {kind}s of a GPU "
                                    f"at rate {fmt_rate(data['rate_ppm'])}")))
    if data["multiplier_ppm"] not in (None, 1_000_000) or data["cheapest"]:
        pairs.append(("tier multiplier", fmt_rate(data["multiplier_ppm"])))
    if data["cheapest"]:
        pairs.append(("cheapest tier", (f"{data['cheapest']} "
                                        f"(x{fmt_rate(data['cheapest_multiplier_ppm'])}): "
                                        f"{fmt_hours(data['cheapest_amount'])} GPU-h")))
    if data["token_id"]:
        pairs.append(("token", data["token_id"]))
        if data["status"] is not None:
            pairs += [("status", data["status"]),
                      ("remaining", f"{fmt_hours(data['remaining'])} GPU-h")]
        pairs.append(("covers", "yes" if data["covers"] else "no"))
        echo_fields(pairs)
        return
    echo_fields(pairs + [("time limit", fmt_duration(seconds))])


@click.command("jobs")
@socket_option
@click.option("--state", type=click.Choice(["pending", "posted", "voided"]))
@click.option("--user", help="Another user (root and the Slurm user only).")
@json_output(JOBS)
@table_output
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
