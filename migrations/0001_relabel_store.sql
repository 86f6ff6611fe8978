-- Relabel store for Hindsight Instruction Relabeling (HIR).
--
-- One HIR run alternates between sampling outputs from the current model,
-- scoring and relabeling them, and training the next model on the relabeled
-- samples. This schema records every step so that a run can be resumed,
-- audited and evaluated with plain SQL:
--
--   runs ─┬─ run_tasks ── tasks ── examples
--         ├─ iterations ─┬─ samples ── relabels
--         │              └─ training_batches ── batch_samples
--         └─ model_versions ── eval_results
--   feedback: instruction tuples submitted by other systems.
--
-- Enumerations are TEXT columns with CHECK constraints. Foreign keys are
-- named `<table>_<what>_fk` so that errors can be explained to callers.

-- ─── runs ────────────────────────────────────────────────────────────────

CREATE TABLE runs (
    id          UUID        PRIMARY KEY,
    name        TEXT        NOT NULL,
    policy      TEXT        NOT NULL,
    config      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    status      TEXT        NOT NULL DEFAULT 'pending'
        CONSTRAINT runs_status_check
        CHECK (status IN ('pending', 'running', 'stopped', 'done', 'failed')),
    error       TEXT        NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

COMMENT ON TABLE runs IS 'One HIR training run. The id is chosen by the caller so that creating a run can be retried safely.';
COMMENT ON COLUMN runs.policy IS 'Name of the relabel policy the run trains with, e.g. ''hir_paper''.';
COMMENT ON COLUMN runs.config IS 'Full run configuration (hyperparameters, model, tasks) as submitted.';
COMMENT ON COLUMN runs.error IS 'Why the run failed or stopped, when it did.';

-- ─── tasks and examples ──────────────────────────────────────────────────

CREATE TABLE tasks (
    id            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT    NOT NULL CONSTRAINT tasks_name_key UNIQUE,
    path          TEXT    NOT NULL,
    kind          TEXT    NOT NULL
        CONSTRAINT tasks_kind_check CHECK (kind IN ('multiple_choice', 'generative')),
    split_seed    BIGINT  NOT NULL,
    n_examples    INT     NOT NULL CONSTRAINT tasks_n_examples_check CHECK (n_examples >= 0),
    train_size    INT     NOT NULL
        CONSTRAINT tasks_train_size_check CHECK (train_size >= 0 AND train_size <= n_examples),
    source_sha256 TEXT    NOT NULL
        CONSTRAINT tasks_source_sha256_check CHECK (source_sha256 ~ '^[0-9a-f]{64}$'),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

COMMENT ON TABLE tasks IS 'A BIG-bench task, e.g. name ''tracking_shuffled_objects_three_objects'', path ''tracking_shuffled_objects/three_objects''.';
COMMENT ON COLUMN tasks.split_seed IS 'Seed of the train/test permutation (the reference code uses 1).';
COMMENT ON COLUMN tasks.train_size IS 'Number of examples in the train split, floor(0.8 * n_examples) in the reference code.';
COMMENT ON COLUMN tasks.source_sha256 IS 'SHA-256 of the task file the examples were built from; a different file under the same name is refused.';

CREATE TABLE examples (
    task_id BIGINT NOT NULL CONSTRAINT examples_task_fk REFERENCES tasks (id) ON DELETE CASCADE,
    idx     INT    NOT NULL CONSTRAINT examples_idx_check CHECK (idx >= 0),
    split   TEXT   NOT NULL CONSTRAINT examples_split_check CHECK (split IN ('train', 'test')),
    prompt  TEXT   NOT NULL,
    target  TEXT   NOT NULL,
    PRIMARY KEY (task_id, idx)
);

COMMENT ON TABLE examples IS 'One example of a task, with the prompt the sampler sends and the gold answer.';
COMMENT ON COLUMN examples.idx IS 'Position of the example in the task file (0-based), not its position in the permutation.';
COMMENT ON COLUMN examples.prompt IS 'The sampler prompt: instruction, blank line, "Q: " entry, "\nA:".';
COMMENT ON COLUMN examples.target IS 'Gold answer string as scored, e.g. ''(C)'' or ''3''.';

CREATE TABLE run_tasks (
    run_id  UUID   NOT NULL CONSTRAINT run_tasks_run_fk REFERENCES runs (id) ON DELETE CASCADE,
    task_id BIGINT NOT NULL CONSTRAINT run_tasks_task_fk REFERENCES tasks (id),
    PRIMARY KEY (run_id, task_id)
);

CREATE INDEX run_tasks_task_id_idx ON run_tasks (task_id);

COMMENT ON TABLE run_tasks IS 'The tasks a run samples from and evaluates on.';

-- ─── iterations ──────────────────────────────────────────────────────────

CREATE TABLE iterations (
    run_id      UUID        NOT NULL CONSTRAINT iterations_run_fk REFERENCES runs (id) ON DELETE CASCADE,
    iteration   INT         NOT NULL CONSTRAINT iterations_iteration_check CHECK (iteration >= 0),
    status      TEXT        NOT NULL DEFAULT 'pending'
        CONSTRAINT iterations_status_check CHECK (status IN (
            'pending', 'sampling', 'sampled', 'training', 'trained', 'evaluating', 'done', 'failed')),
    error       TEXT        NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ NULL,
    PRIMARY KEY (run_id, iteration)
);

COMMENT ON TABLE iterations IS 'One round of sample -> relabel -> train -> evaluate within a run.';
COMMENT ON COLUMN iterations.status IS 'Advanced by compare-and-set: pending, sampling, sampled, training, trained, evaluating, done (or failed).';
COMMENT ON COLUMN iterations.finished_at IS 'Set when the iteration reaches done or failed.';

-- ─── model versions ──────────────────────────────────────────────────────

CREATE TABLE model_versions (
    id             BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           TEXT        NOT NULL CONSTRAINT model_versions_name_key UNIQUE,
    run_id         UUID        NULL CONSTRAINT model_versions_run_fk REFERENCES runs (id),
    iteration      INT         NULL CONSTRAINT model_versions_iteration_check CHECK (iteration >= 0),
    parent_id      BIGINT      NULL CONSTRAINT model_versions_parent_fk REFERENCES model_versions (id),
    checkpoint_uri TEXT        NOT NULL,
    sha256         TEXT        NOT NULL
        CONSTRAINT model_versions_sha256_check CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    metrics        JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX model_versions_run_id_idx ON model_versions (run_id);
CREATE INDEX model_versions_parent_id_idx ON model_versions (parent_id);

COMMENT ON TABLE model_versions IS 'A model checkpoint. Base models have no run; trained ones name the run and iteration that produced them.';
COMMENT ON COLUMN model_versions.name IS 'Opaque version string the generator reports with each output.';
COMMENT ON COLUMN model_versions.sha256 IS 'SHA-256 of the checkpoint, 64 lowercase hex digits. A name is bound to one checksum forever.';
COMMENT ON COLUMN model_versions.metrics IS 'Training metrics recorded with the checkpoint (loss, perplexity, ...).';

-- ─── samples and relabels ────────────────────────────────────────────────

CREATE TABLE samples (
    id                BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            UUID        NOT NULL,
    iteration         INT         NOT NULL,
    task_id           BIGINT      NOT NULL,
    example_idx       INT         NOT NULL,
    sample_idx        INT         NOT NULL CONSTRAINT samples_sample_idx_check CHECK (sample_idx >= 0),
    model_version_id  BIGINT      NOT NULL CONSTRAINT samples_model_version_fk REFERENCES model_versions (id),
    prompt            TEXT        NOT NULL,
    output            TEXT        NOT NULL,
    output_tokens     INT[]       NOT NULL DEFAULT '{}',
    finish_reason     TEXT        NOT NULL,
    score             REAL        NOT NULL CONSTRAINT samples_score_check CHECK (score >= 0 AND score <= 1),
    correct           BOOLEAN     NOT NULL,
    correct_extracted BOOLEAN     NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT samples_natural_key UNIQUE (run_id, iteration, task_id, example_idx, sample_idx),
    CONSTRAINT samples_iteration_fk FOREIGN KEY (run_id, iteration)
        REFERENCES iterations (run_id, iteration) ON DELETE CASCADE,
    CONSTRAINT samples_example_fk FOREIGN KEY (task_id, example_idx)
        REFERENCES examples (task_id, idx)
);

-- (run_id, iteration) is served by the natural key's index.
CREATE INDEX samples_example_idx ON samples (task_id, example_idx);
CREATE INDEX samples_model_version_id_idx ON samples (model_version_id);

COMMENT ON TABLE samples IS 'One scored output sampled from a model for a train example. Natural key: (run_id, iteration, task_id, example_idx, sample_idx).';
COMMENT ON COLUMN samples.prompt IS 'The exact prompt the model was given.';
COMMENT ON COLUMN samples.output_tokens IS 'Token ids of the output as generated, so training does not have to re-tokenize.';
COMMENT ON COLUMN samples.finish_reason IS 'Why generation stopped, as reported by the generator (e.g. ''stop'', ''length'').';
COMMENT ON COLUMN samples.score IS 'Reward in [0, 1] from the scorer.';
COMMENT ON COLUMN samples.correct IS 'The paper''s exact match: normalized output equals normalized target.';
COMMENT ON COLUMN samples.correct_extracted IS 'Match after extracting the answer (e.g. the option letter) from the output.';

CREATE TABLE relabels (
    sample_id            BIGINT NOT NULL CONSTRAINT relabels_sample_fk REFERENCES samples (id) ON DELETE CASCADE,
    policy               TEXT   NOT NULL,
    positive_instruction TEXT   NOT NULL,
    negative_instruction TEXT   NOT NULL,
    PRIMARY KEY (sample_id, policy)
);

COMMENT ON TABLE relabels IS 'Hindsight instructions for a sample under a relabel policy: the output is trained under positive_instruction and contrasted against negative_instruction.';

-- ─── feedback from other systems ─────────────────────────────────────────

CREATE TABLE feedback (
    id                   BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source               TEXT        NOT NULL,
    external_id          TEXT        NOT NULL,
    run_id               UUID        NULL CONSTRAINT feedback_run_fk REFERENCES runs (id),
    instruction          TEXT        NOT NULL,
    query                TEXT        NOT NULL,
    output               TEXT        NOT NULL,
    feedback             JSONB       NOT NULL DEFAULT '{}'::jsonb,
    policy               TEXT        NOT NULL,
    positive_instruction TEXT        NOT NULL,
    negative_instruction TEXT        NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT feedback_source_external_id_key UNIQUE (source, external_id)
);

CREATE INDEX feedback_run_id_idx ON feedback (run_id);

COMMENT ON TABLE feedback IS '(instruction, query, output, feedback) tuples submitted by other systems, with their relabeled instructions. (source, external_id) makes resubmission idempotent.';

-- ─── training batches ────────────────────────────────────────────────────

CREATE TABLE training_batches (
    id               BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id           UUID        NOT NULL,
    iteration        INT         NOT NULL,
    batch_idx        INT         NOT NULL CONSTRAINT training_batches_batch_idx_check CHECK (batch_idx >= 0),
    status           TEXT        NOT NULL DEFAULT 'pending'
        CONSTRAINT training_batches_status_check CHECK (status IN ('pending', 'leased', 'done')),
    lease_owner      TEXT        NULL,
    lease_expires_at TIMESTAMPTZ NULL,
    attempts         INT         NOT NULL DEFAULT 0 CONSTRAINT training_batches_attempts_check CHECK (attempts >= 0),
    progress         JSONB       NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    done_at          TIMESTAMPTZ NULL,
    CONSTRAINT training_batches_natural_key UNIQUE (run_id, iteration, batch_idx),
    CONSTRAINT training_batches_iteration_fk FOREIGN KEY (run_id, iteration)
        REFERENCES iterations (run_id, iteration) ON DELETE CASCADE,
    CONSTRAINT training_batches_lease_check CHECK (
        status <> 'leased' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT training_batches_done_check CHECK (status <> 'done' OR done_at IS NOT NULL)
);

-- The work queue: only unfinished batches, in the order they are handed out.
CREATE INDEX training_batches_queue_idx ON training_batches (run_id, iteration, batch_idx)
    WHERE status IN ('pending', 'leased');

COMMENT ON TABLE training_batches IS 'Work queue of training batches. Trainers lease batches, and complete them in the same transaction as their own progress.';
COMMENT ON COLUMN training_batches.lease_owner IS 'Trainer holding (or, once done, last holding) the batch.';
COMMENT ON COLUMN training_batches.lease_expires_at IS 'After this instant a leased batch may be leased again by anyone.';
COMMENT ON COLUMN training_batches.attempts IS 'How many times the batch was leased.';
COMMENT ON COLUMN training_batches.progress IS 'What the trainer recorded when it completed the batch (step, loss, ...).';

CREATE TABLE batch_samples (
    batch_id  BIGINT NOT NULL CONSTRAINT batch_samples_batch_fk REFERENCES training_batches (id) ON DELETE CASCADE,
    sample_id BIGINT NOT NULL CONSTRAINT batch_samples_sample_fk REFERENCES samples (id) ON DELETE CASCADE,
    PRIMARY KEY (batch_id, sample_id)
);

CREATE INDEX batch_samples_sample_id_idx ON batch_samples (sample_id);

COMMENT ON TABLE batch_samples IS 'Samples in each training batch. A sample may appear in batches of several iterations (replay).';

-- ─── evaluation ──────────────────────────────────────────────────────────

CREATE TABLE eval_results (
    model_version_id  BIGINT      NOT NULL CONSTRAINT eval_results_model_version_fk REFERENCES model_versions (id),
    task_id           BIGINT      NOT NULL,
    example_idx       INT         NOT NULL,
    prompt_style      TEXT        NOT NULL,
    run_id            UUID        NULL CONSTRAINT eval_results_run_fk REFERENCES runs (id),
    iteration         INT         NULL CONSTRAINT eval_results_iteration_check CHECK (iteration >= 0),
    output            TEXT        NOT NULL,
    correct           BOOLEAN     NOT NULL,
    correct_extracted BOOLEAN     NOT NULL,
    predicted         TEXT        NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version_id, task_id, example_idx, prompt_style),
    CONSTRAINT eval_results_example_fk FOREIGN KEY (task_id, example_idx)
        REFERENCES examples (task_id, idx)
);

CREATE INDEX eval_results_example_idx ON eval_results (task_id, example_idx);
CREATE INDEX eval_results_run_id_idx ON eval_results (run_id);

COMMENT ON TABLE eval_results IS 'Greedy evaluation of a model version on one test example.';
COMMENT ON COLUMN eval_results.prompt_style IS 'How the prompt was built, e.g. ''raw'' (the reference evaluator) or ''chat''.';
COMMENT ON COLUMN eval_results.predicted IS 'Answer extracted from the output, e.g. ''(A)''; shows collapse to one letter.';
