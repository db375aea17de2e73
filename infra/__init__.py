"""The boltstream CLI, its typed configuration and the local stack it starts (broker, archive, workers)."""
