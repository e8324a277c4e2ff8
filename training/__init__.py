"""The training skeleton every training of this project fills in (``training.loop``): data order
and per-step randomness, resumable checkpoints kept only once proven good, strict-JSON logs,
sample grids, the non-finite guard, weight snapshots for averaging; and optimizer state IO."""
