"""The training engine: the one loop every stage runs, its run folder, evaluation, schedule and trackers."""
