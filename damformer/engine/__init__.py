"""Training machinery: schedules, optimiser groups, checkpoints, the loop."""
