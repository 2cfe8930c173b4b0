-- The lifecycle events relay's position in the transition history: every transition up
-- to last_transition_id has been published to the events exchange (or needs none).
-- One row; the coordinator that holds its row lock is the one relaying.
CREATE TABLE event_relay (
    id                  INT PRIMARY KEY CHECK (id = 1),
    last_transition_id  BIGINT NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Start after whatever history exists when events are introduced.
INSERT INTO event_relay (id, last_transition_id)
SELECT 1, COALESCE((SELECT last_value FROM transition_ids WHERE is_called), 0);
