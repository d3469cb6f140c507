"""The training wing of `pneumoscan train --data DIR --out RUN_DIR`, read top to bottom:

- `run`: the run as one function: the verdict on the run folder (new, resume, finished,
  conflict; `run_folder`), the split, the model, the fit, the finish.
- `fit`: a new compiled model, and `fit_arrays()`, training on arrays (benchmarks reuse it).
- `batches`: the input batches of every replica, a function of (seed, epoch).
- `progress`: what the run has done so far (the state a checkpoint saves), the history and the
  best epoch with early stopping.
- `schedule`: the learning rate of every epoch (cosine or reduced on plateau).
- `checkpoint`: the atomic per-epoch checkpoint and the random state of dropout.
- `loop`: the training loop, one for every strategy.
- `strategy`: where training runs (one device, mirrored, multi-worker) and how workers agree.
- `finish`: the best weights into `model.keras`, calibration, trust and `metadata.json`.

The package imports nothing here, so `import pneumoscan.training.strategy` stays light.
"""
