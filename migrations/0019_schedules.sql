-- Schedules: tasks created on a clock (shared/src/store/schedules.rs).
--
-- `next_fire_at` is the next fire time still to consider: a coordinator that finds it
-- past locks the row (skipping rows another holds), creates the tasks of the fire times
-- due (idempotency key `schedule:<name>:<fire time>`), records them in
-- `schedule_fires` (one row per schedule and fire time: the primary key), and moves
-- `next_fire_at` past now, in one transaction. So a window fires once, whatever the
-- number of coordinators. `source` says where the schedule came from: `api`, or
-- `template` (a template file's `schedules:`, loaded from `TASKER_TEMPLATES_DIR`).
CREATE TABLE schedules (
    name          TEXT PRIMARY KEY,
    namespace     TEXT NOT NULL,
    template      TEXT NOT NULL,
    version       TEXT,
    cron          TEXT NOT NULL,
    timezone      TEXT NOT NULL DEFAULT 'UTC',
    context       JSONB NOT NULL DEFAULT '{}',
    overlap       TEXT NOT NULL DEFAULT 'allow'
                  CHECK (overlap IN ('allow', 'skip', 'cancel_previous')),
    catch_up      TEXT NOT NULL DEFAULT 'none' CHECK (catch_up IN ('none', 'latest', 'all')),
    paused        BOOLEAN NOT NULL DEFAULT false,
    source        TEXT NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'template')),
    next_fire_at  TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The scheduler's look for due schedules, and for when the next one is.
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;

-- Each fire time of each schedule, once: the task it created, or why it created none
-- (`skipped`: the previous task still ran with `overlap: skip`; `missed`: past the
-- grace with `catch_up` saying not to run it; `failed`: the task could not be created,
-- its template gone or its context refused). The scheduler keeps the last 100 per
-- schedule.
CREATE TABLE schedule_fires (
    schedule   TEXT NOT NULL REFERENCES schedules (name) ON DELETE CASCADE,
    fire_at    TIMESTAMPTZ NOT NULL,
    task_id    UUID,
    outcome    TEXT NOT NULL CHECK (outcome IN ('fired', 'skipped', 'missed', 'failed')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- From the history's sequence: the events relay publishes fires with the transitions
    -- (`schedule.fired`, `schedule.skipped`).
    transition_id BIGINT NOT NULL DEFAULT nextval('transition_ids'),
    PRIMARY KEY (schedule, fire_at)
);

CREATE INDEX schedule_fires_by_transition ON schedule_fires (transition_id);
