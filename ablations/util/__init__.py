"""Small helpers every layer may use, one of each: durations and ETA, liveness, the device, paths beside the
store, atomic file writes. Nothing here imports the rest of the harness."""
