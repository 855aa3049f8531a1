"""The pieces of a training run the recipe puts together: run directory, resume policy, schedules, metrics log,
signals."""
