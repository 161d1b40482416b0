-- Portable SQL, like 0001. The build cache a build ran with: its key's name and id (the
-- namespace is the requester's), and `cache`: `hit`, `miss`, `off` (the node has the cache
-- off) or `error` (the fork failed, so the build ran without one).
ALTER TABLE builds ADD COLUMN cache_key TEXT;
ALTER TABLE builds ADD COLUMN cache_id TEXT;
ALTER TABLE builds ADD COLUMN cache TEXT;
CREATE INDEX builds_by_cache ON builds (cache_id, state);
