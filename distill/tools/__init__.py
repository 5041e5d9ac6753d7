"""After training: evaluate, info, export, predict, soups, ensembles, test-time augmentation, benchmark, report."""
