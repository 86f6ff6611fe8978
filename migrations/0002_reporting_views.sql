-- Reporting views over the relabel store. Each answers a common question
-- with a plain SELECT, e.g.
--   SELECT * FROM iteration_accuracy WHERE run_id = '...' ORDER BY iteration, task;

CREATE VIEW sample_details AS
SELECT
    s.id                   AS sample_id,
    s.run_id,
    r.name                 AS run_name,
    s.iteration,
    t.name                 AS task,
    s.example_idx,
    s.sample_idx,
    mv.name                AS version,
    s.prompt,
    s.output,
    s.score,
    s.correct,
    s.correct_extracted,
    rl.policy,
    rl.positive_instruction,
    rl.negative_instruction
FROM samples s
JOIN runs r            ON r.id = s.run_id
JOIN tasks t           ON t.id = s.task_id
JOIN model_versions mv ON mv.id = s.model_version_id
LEFT JOIN relabels rl  ON rl.sample_id = s.id;

COMMENT ON VIEW sample_details IS 'Samples with names instead of ids and their relabels (one row per relabel; NULL policy when a sample has none).';

CREATE VIEW iteration_accuracy AS
SELECT
    s.run_id,
    r.name                                                    AS run_name,
    s.iteration,
    t.name                                                    AS task,
    count(*)                                                  AS samples,
    count(*) FILTER (WHERE s.correct)                         AS correct,
    count(*) FILTER (WHERE s.correct_extracted)               AS correct_extracted,
    (count(*) FILTER (WHERE s.correct))::float8 / count(*)           AS accuracy,
    (count(*) FILTER (WHERE s.correct_extracted))::float8 / count(*) AS accuracy_extracted
FROM samples s
JOIN runs r  ON r.id = s.run_id
JOIN tasks t ON t.id = s.task_id
GROUP BY s.run_id, r.name, s.iteration, t.name;

COMMENT ON VIEW iteration_accuracy IS 'Share of sampled outputs that were correct, per run, iteration and task.';

CREATE VIEW eval_accuracy AS
SELECT
    e.model_version_id,
    mv.name                                                          AS version,
    e.run_id,
    e.iteration,
    t.name                                                           AS task,
    e.prompt_style,
    count(*)                                                         AS n,
    (count(*) FILTER (WHERE e.correct))::float8 / count(*)           AS accuracy,
    (count(*) FILTER (WHERE e.correct_extracted))::float8 / count(*) AS accuracy_extracted
FROM eval_results e
JOIN model_versions mv ON mv.id = e.model_version_id
JOIN tasks t           ON t.id = e.task_id
GROUP BY e.model_version_id, mv.name, e.run_id, e.iteration, t.name, e.prompt_style;

COMMENT ON VIEW eval_accuracy IS 'Test accuracy per model version, task and prompt style (the paper''s metric is accuracy).';

CREATE VIEW batches_consumed AS
SELECT
    b.id            AS batch_id,
    b.run_id,
    b.iteration,
    b.batch_idx,
    b.status,
    b.lease_owner,
    b.attempts,
    (SELECT count(*) FROM batch_samples bs WHERE bs.batch_id = b.id) AS samples,
    b.done_at,
    b.progress
FROM training_batches b;

COMMENT ON VIEW batches_consumed IS 'Training batches with their size, who holds or completed them, and the progress recorded at completion.';
