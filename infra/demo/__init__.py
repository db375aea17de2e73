"""The closed-loop demo (``boltstream demo``): its tiny model, its arithmetic task, its private stack, its fleet
of agents, its live view and its report."""
