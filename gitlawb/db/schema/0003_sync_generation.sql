-- Schema v3: a sync row counts the ref updates folded into it, so that a
-- worker finishing a row can tell whether an update arrived while its git
-- ran (the row then runs once more instead of being marked done).
ALTER TABLE sync_queue ADD COLUMN generation integer NOT NULL DEFAULT 0;
