"""Stream processors: the reward/trajectory join (Faust) and its core, credit assignment, the ClickHouse
archive and its read endpoint, analytics, replay."""
