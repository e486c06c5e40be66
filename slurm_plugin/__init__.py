"""gpuledger on the Slurm side: SPANK plugin, job_submit.lua, prolog/epilog, node agent, adapters."""
