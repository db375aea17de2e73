"""Avro schemas of every boltstream record (every version kept), their codecs and the ClickHouse DDL."""
