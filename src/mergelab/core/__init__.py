"""The merge core: state dicts and task vectors, per-tensor kernels, the merge formula, functional and
per-sample calls, model I/O and atomic files. Imports nothing else of mergelab."""
