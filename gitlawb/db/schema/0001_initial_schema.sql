-- Schema v1: everything PROTOCOL.md needs.  Timestamps are timestamptz and are
-- rendered to the protocol's RFC 3339 form by the code; a certificate keeps its
-- issued_at as text because the signature covers that exact string.

CREATE TABLE agents (
    did            text PRIMARY KEY,
    capabilities   jsonb NOT NULL DEFAULT '[]'::jsonb,
    model          text,
    trust_score    double precision NOT NULL DEFAULT 0.05,
    push_count     bigint NOT NULL DEFAULT 0,
    status         text NOT NULL DEFAULT 'active'
                   CHECK (status IN ('active', 'revoked')),
    registered_at  timestamptz NOT NULL DEFAULT now(),
    last_seen      timestamptz
);

CREATE TABLE repos (
    id              uuid PRIMARY KEY,
    owner_did       text NOT NULL,
    name            text NOT NULL,
    description     text,
    is_public       boolean NOT NULL DEFAULT true,
    default_branch  text NOT NULL DEFAULT 'main',
    star_count      integer NOT NULL DEFAULT 0,
    forked_from     text,
    -- A mirror of another node's repository: where it came from.
    origin_did      text,
    origin_url      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_did, name)
);
CREATE INDEX repos_created_at ON repos (created_at DESC);

-- A push that reached git: written before receive-pack starts, closed in the
-- transaction that records what git did.  One left 'running' after a crash is
-- reconciled against the refs on disk at the next start.
CREATE TABLE push_intents (
    id           uuid PRIMARY KEY,
    repo_id      uuid NOT NULL REFERENCES repos (id) ON DELETE CASCADE,
    pusher_did   text NOT NULL,
    commands     jsonb NOT NULL,
    state        text NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'recorded', 'abandoned')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX push_intents_running ON push_intents (created_at) WHERE state = 'running';

CREATE TABLE push_events (
    id          bigserial PRIMARY KEY,
    push_id     uuid NOT NULL,
    repo_id     uuid NOT NULL REFERENCES repos (id) ON DELETE CASCADE,
    pusher_did  text NOT NULL,
    ref_name    text NOT NULL,
    old_sha     text NOT NULL,
    new_sha     text NOT NULL,
    forced      boolean NOT NULL DEFAULT false,
    pushed_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (push_id, ref_name)
);
CREATE INDEX push_events_repo ON push_events (repo_id, pushed_at DESC);

CREATE TABLE ref_certificates (
    id          uuid PRIMARY KEY,
    repo_id     uuid NOT NULL REFERENCES repos (id) ON DELETE CASCADE,
    ref_name    text NOT NULL,
    old_sha     text NOT NULL,
    new_sha     text NOT NULL,
    pusher_did  text NOT NULL,
    node_did    text NOT NULL,
    signature   text NOT NULL,
    issued_at   text NOT NULL,
    UNIQUE (repo_id, ref_name)
);

-- Work that must happen after a push, written in the push's transaction.
CREATE TABLE outbox (
    id               bigserial PRIMARY KEY,
    kind             text NOT NULL,
    payload          jsonb NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_until    timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    done_at          timestamptz
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE done_at IS NULL;

CREATE TABLE webhooks (
    id              uuid PRIMARY KEY,
    repo_id         uuid NOT NULL REFERENCES repos (id) ON DELETE CASCADE,
    url             text NOT NULL,
    secret          text,
    events          jsonb NOT NULL DEFAULT '["*"]'::jsonb,
    created_by_did  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    active          boolean NOT NULL DEFAULT true
);
CREATE INDEX webhooks_repo ON webhooks (repo_id);

CREATE TABLE webhook_deliveries (
    id                uuid PRIMARY KEY,
    webhook_id        uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event             text NOT NULL,
    -- The exact body sent: every retry carries the same bytes and HMAC.
    body              text NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    last_status_code  integer,
    last_error        text,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    claimed_until     timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';

CREATE TABLE peers (
    did           text PRIMARY KEY,
    http_url      text NOT NULL,
    repo_count    integer,
    signed        boolean NOT NULL DEFAULT false,
    reachable     boolean NOT NULL DEFAULT true,
    last_seen     timestamptz NOT NULL DEFAULT now(),
    announced_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sync_queue (
    id               bigserial PRIMARY KEY,
    origin_did       text NOT NULL,
    origin_url       text NOT NULL,
    repo_slug        text NOT NULL,
    owner_did        text,
    ref_name         text,
    new_sha          text,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'done', 'failed', 'rejected')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_by       text,
    claimed_until    timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- One live row per (origin, repository): later notifies fold into it.
CREATE UNIQUE INDEX sync_queue_one_live ON sync_queue (origin_did, repo_slug)
    WHERE status IN ('pending', 'running');
CREATE INDEX sync_queue_due ON sync_queue (next_attempt_at) WHERE status = 'pending';

CREATE TABLE ref_updates_received (
    id           bigserial PRIMARY KEY,
    node_did     text NOT NULL,
    pusher_did   text,
    repo         text NOT NULL,
    owner_did    text,
    ref_name     text NOT NULL,
    old_sha      text,
    new_sha      text NOT NULL,
    "timestamp"  text,
    cert_id      text,
    from_peer    text,
    verified     boolean NOT NULL DEFAULT false,
    received_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (node_did, repo, ref_name, new_sha)
);

CREATE TABLE replicas (
    repo_id        uuid NOT NULL REFERENCES repos (id) ON DELETE CASCADE,
    url            text NOT NULL,
    node_did       text,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo_id, url)
);
