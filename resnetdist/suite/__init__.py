"""The paper's suite: many runs (reproduce.py), on Slurm (slurm.py), and the report (report.py,
from discover.py's runs, tables.py's tables and figures.py's figures)."""
