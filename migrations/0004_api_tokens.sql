-- API tokens for the HTTP API (docs/security.md). Only the SHA-256 of each secret is
-- kept: the secret is 32 random bytes, shown once by `tasker-coordinator token create`.
-- Rows are never deleted, so `token list` keeps showing who had access and when.
CREATE TABLE api_tokens (
    token_id      UUID PRIMARY KEY,
    name          TEXT NOT NULL CHECK (name <> ''),
    secret_hash   BYTEA NOT NULL UNIQUE CHECK (octet_length(secret_hash) = 32),
    scopes        TEXT[] NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ,
    -- Written at most once a minute per token, not on every request.
    last_used_at  TIMESTAMPTZ
);
-- A name picks one active token (`token revoke ci`); a revoked name may be reused.
CREATE UNIQUE INDEX api_tokens_active_name ON api_tokens (name) WHERE revoked_at IS NULL;
