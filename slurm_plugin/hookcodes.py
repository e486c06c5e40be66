"""Exit codes the hooks share with their entry (standard library only: ``hookmain``)."""

REQUEUE = 75  # PrologSlurmctld: the wrapper turns this into a non-zero exit (Slurm requeues)
