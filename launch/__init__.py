"""Launchers: local processes, Cloud TPU VM pods, Slurm GPU clusters (each `--dry_run` prints what it would run)."""
