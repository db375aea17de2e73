-- Dead letters: every record of the DLQ topic (bad input of any worker, with the raw bytes and the
-- reason), kept for inspection and replay. event_id is the dead letter's own id. Ordered by source
-- topic so "what went wrong on topic X" is a key range; partitioned by the day it was dead-lettered.
CREATE TABLE IF NOT EXISTS dead_letters_store
(
    event_id String,
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    key Nullable(String),
    value String,
    reason String,
    error_type LowCardinality(String),
    worker LowCardinality(String),
    timestamp_us Int64,
    archived_at DateTime64(6) DEFAULT now64(6),
    CONSTRAINT event_id_present CHECK event_id != ''
)
ENGINE = ReplacingMergeTree(archived_at)
PARTITION BY toDate(fromUnixTimestamp64Micro(timestamp_us))
ORDER BY (source_topic, event_id)
COMMENT 'the store behind the dead_letters view; query dead_letters';

CREATE TABLE IF NOT EXISTS dead_letters_ingest
(
    event_id String,
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    key Nullable(String),
    value String,
    reason String,
    error_type String,
    worker String,
    timestamp_us Int64
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS dead_letters_ingest_mv TO dead_letters_store AS
SELECT * FROM dead_letters_ingest;

-- Every dead letter exactly once.
CREATE OR REPLACE VIEW dead_letters AS SELECT * FROM dead_letters_store FINAL
COMMENT 'every record a worker could not process, with its raw bytes (key, value) and the reason';
