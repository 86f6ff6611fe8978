-- The trainer's committed state, one row per run, and a view of its steps.
--
-- A trainer writes its resumable state (weights, optimizer moments, data cursor) to a
-- snapshot, then in ONE transaction marks the batches it trained on done and points this
-- row at the snapshot. After a crash the run continues from exactly this state: batches
-- done are in the snapshot, batches not done are not.

CREATE TABLE trainer_states (
    run_id     UUID        PRIMARY KEY CONSTRAINT trainer_states_run_fk REFERENCES runs (id) ON DELETE CASCADE,
    step       BIGINT      NOT NULL CONSTRAINT trainer_states_step_check CHECK (step >= 0),
    iteration  INT         NOT NULL CONSTRAINT trainer_states_iteration_check CHECK (iteration >= 0),
    state_uri  TEXT        NOT NULL,
    sha256     TEXT        NOT NULL
        CONSTRAINT trainer_states_sha256_check CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    owner      TEXT        NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

COMMENT ON TABLE trainer_states IS 'Last committed training state of a run: the optimizer step, the iteration, and the snapshot (weights, AdamW moments) that holds it. Advanced by compare-and-set on step.';
COMMENT ON COLUMN trainer_states.state_uri IS 'Where the snapshot lives, as the trainer sees it.';
COMMENT ON COLUMN trainer_states.sha256 IS 'SHA-256 of the snapshot manifest; a snapshot that does not match is refused on resume.';

-- One row per optimizer step, from what the trainer recorded with each batch.
CREATE VIEW training_steps AS
SELECT b.run_id,
       b.iteration,
       b.batch_idx,
       (b.progress ->> 'step')::bigint              AS step,
       (b.progress ->> 'loss')::float8              AS loss,
       (b.progress ->> 'loss_supervised')::float8   AS loss_supervised,
       (b.progress ->> 'loss_contrastive')::float8  AS loss_contrastive,
       (b.progress ->> 'entropy')::float8           AS entropy,
       (b.progress ->> 'grad_norm')::float8         AS grad_norm,
       (b.progress ->> 'examples')::int             AS examples,
       (b.progress ->> 'tokens')::bigint            AS tokens,
       (b.progress ->> 'step_ms')::float8           AS step_ms,
       b.lease_owner                                AS trainer,
       b.done_at
FROM training_batches b
WHERE b.status = 'done';

COMMENT ON VIEW training_steps IS 'Optimizer steps as committed by the trainer: loss and its terms, gradient norm, examples, tokens and wall time per step.';
