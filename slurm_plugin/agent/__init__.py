"""Node agent: samples GPUs with NVML and keeps per-job usage for the epilog."""
