"""Faust stream processors: reward/trajectory join, sampling, credit assignment, the ClickHouse archive, replay."""
