"""The closed-loop demo (``boltstream demo``): its tiny model, its arithmetic task, its fleet of agents and
its report."""
