-- Portable SQL: runs unchanged on SQLite and PostgreSQL. Times are Unix milliseconds.
CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    phase TEXT,
    request TEXT NOT NULL,
    requester TEXT NOT NULL,
    repo_url TEXT NOT NULL,
    revision TEXT NOT NULL,
    commit_sha TEXT,
    notify_url TEXT,
    vcpus BIGINT NOT NULL,
    mem_mib BIGINT NOT NULL,
    timeout_s BIGINT NOT NULL,
    node_id TEXT,
    cpus TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    error_class TEXT,
    error_phase TEXT,
    error_message TEXT,
    rootfs_location TEXT,
    rootfs_size_bytes BIGINT,
    rootfs_sha256 TEXT,
    image_digest TEXT,
    report TEXT,
    vmm_exit_code BIGINT,
    log_tail TEXT,
    webhook_state TEXT NOT NULL,
    webhook_attempts BIGINT NOT NULL DEFAULT 0,
    webhook_error TEXT,
    created_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT,
    vm_started_at_ms BIGINT,
    finished_at_ms BIGINT,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX builds_by_state ON builds (state, id);
CREATE INDEX builds_by_node ON builds (node_id, state);

CREATE TABLE build_events (
    build_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    node_id TEXT,
    detail TEXT,
    PRIMARY KEY (build_id, seq)
);

-- Signatures of accepted guest reports, so a replayed report is refused.
CREATE TABLE seen_signatures (
    signature TEXT PRIMARY KEY,
    build_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
