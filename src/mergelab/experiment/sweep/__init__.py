"""Sweeps and coefficient searches, in this process or on a Ray cluster (``mergelab sweep``, docs/cluster.md).

- :mod:`.config`: the sweep YAML (pydantic; errors name the file, line and field);
- :mod:`.studies`: task subsets, grids, seeded random draws, Optuna searches (the driver owns the study);
- :mod:`.trial`: a trial's content and id, :func:`~.trial.execute_trial` (the one trial function);
- :mod:`.executor`: in-process or Ray tasks with the trial's CPUs and GPUs;
- :mod:`.run`: the driver (restart skips what finished, failures are recorded);
- :mod:`.report`: results.json / results.md / plots.
"""

from mergelab.experiment.sweep.config import SweepConfig, load_sweep_config, parse_sweep_config
from mergelab.experiment.sweep.run import SweepRun, run_sweep

__all__ = ["SweepConfig", "SweepRun", "load_sweep_config", "parse_sweep_config", "run_sweep"]
