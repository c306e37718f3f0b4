"""The paper's suite: many runs (reproduce.py), on Slurm (slurm.py), and the report (report.py)."""
