"""The experiment layer: the runner (pool x rows -> results), run configs, run folders, reports, plots
and analyses. Imports the pools, methods and core layers, never the CLI."""
