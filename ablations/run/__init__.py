"""Running cells: one cell -> one MLflow run (`runner`), the queue that hands cells to workers
(`cellqueue`, `storage`, `heartbeat`), the workers and their launcher (`worker`, `launcher`, `options`,
`output`), the time limit (`timelimit`), progress lines (`progress`) and the preflight check (`preflight`).

From Python: `run_grids(RunOptions(...))` runs grids as run_ablation.py does (`api`).
"""

from ablations.run.api import dispatch, prepare, run_grids, stop_requests
from ablations.run.options import RunOptions

__all__ = ["RunOptions", "dispatch", "prepare", "run_grids", "stop_requests"]
