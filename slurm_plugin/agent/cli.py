"""`gpuledger agent`: the long-lived node agent process."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from ledger import logformat
from ledger.cli.output import no_json
from slurm_plugin.agent.config import AgentConfig
from slurm_plugin.agent.core import Agent
from slurm_plugin.agent.server import AgentServer
from slurm_plugin.agent.spool import Spool

log = logging.getLogger("gpuledger.agent")


async def run_agent(cfg: AgentConfig) -> None:
    """Start the agent, serve until SIGTERM/SIGINT, then persist and close NVML."""
    specs = cfg.specs()
    if not specs:
        log.warning("gpuledger-agent: no GPUs for node %s in %s", cfg.node_name, cfg.gres_conf)
    agent = Agent(
        Spool(cfg.spool),
        specs,
        mig_minors=cfg.mig_minor_map(),
        keep_finished_s=cfg.keep_finished_days * 86400,
        idle=cfg.idle,
    )
    agent.start()
    server = AgentServer(agent, cfg.socket, float(cfg.interval), allowed_uids=cfg.allowed_uids)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop_event.set)
    try:
        await server.serve()
    finally:
        agent.stop()
        log.info("gpuledger-agent: stopped after %d rounds", server.rounds)


@click.command("agent")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file with an [agent] table.")
@click.option("--socket", "socket_path", default=None, help="Unix socket path.")
@click.option("--spool", default=None, help="Spool directory.")
@click.option("--interval", type=float, default=None, help="Seconds between samples (default 1).")
@no_json("runs the node agent in the foreground")
def agent(config_path: str | None, socket_path: str | None, spool: str | None,
          interval: float | None) -> None:
    """Run the node agent: sample GPUs with NVML and keep per-job usage."""
    logformat.setup()  # dated lines: a log file written without journald is dated too
    try:
        cfg = AgentConfig.load(config_path, socket=socket_path, spool=spool, interval=interval)
    except (OSError, ValueError, TypeError) as exc:
        raise click.ClickException(f"agent config: {exc}") from None
    try:
        asyncio.run(run_agent(cfg))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
