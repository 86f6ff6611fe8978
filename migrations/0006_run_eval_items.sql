-- Which evaluation results each run read, per iteration.
--
-- A greedy answer is a function of the version and the prompt, so `eval_results` keeps one
-- row per (version, example, prompt style), and a second run from the same starting model
-- scores its base evaluation from the rows the first run wrote. Those rows carry the first
-- run's id; this table links every run to each result it scored, so a run's view (and the
-- `eval_accuracy` view below) shows every iteration it evaluated, reused answers included.

CREATE TABLE run_eval_items (
    run_id           UUID   NOT NULL CONSTRAINT run_eval_items_run_fk REFERENCES runs (id),
    iteration        INT    NOT NULL CONSTRAINT run_eval_items_iteration_check CHECK (iteration >= 0),
    model_version_id BIGINT NOT NULL,
    task_id          BIGINT NOT NULL,
    example_idx      INT    NOT NULL,
    prompt_style     TEXT   NOT NULL,
    PRIMARY KEY (run_id, iteration, task_id, example_idx, prompt_style),
    CONSTRAINT run_eval_items_result_fk
        FOREIGN KEY (model_version_id, task_id, example_idx, prompt_style)
        REFERENCES eval_results (model_version_id, task_id, example_idx, prompt_style)
);

CREATE INDEX run_eval_items_result_idx
    ON run_eval_items (model_version_id, task_id, example_idx, prompt_style);

COMMENT ON TABLE run_eval_items IS 'The evaluation results a run scored at an iteration: its own, or a version''s answers stored by an earlier run and reused.';

-- Every result written under a run so far was scored by that run.
INSERT INTO run_eval_items (run_id, iteration, model_version_id, task_id, example_idx, prompt_style)
SELECT run_id, iteration, model_version_id, task_id, example_idx, prompt_style
FROM eval_results
WHERE run_id IS NOT NULL AND iteration IS NOT NULL;

-- Per run and iteration through the links; results outside any run as before.
CREATE OR REPLACE VIEW eval_accuracy AS
WITH scored AS (
    SELECT l.model_version_id, l.run_id, l.iteration, l.task_id, l.prompt_style,
           e.correct, e.correct_extracted
    FROM run_eval_items l
    JOIN eval_results e USING (model_version_id, task_id, example_idx, prompt_style)
    UNION ALL
    SELECT e.model_version_id, e.run_id, e.iteration, e.task_id, e.prompt_style,
           e.correct, e.correct_extracted
    FROM eval_results e
    WHERE e.run_id IS NULL OR e.iteration IS NULL
)
SELECT
    s.model_version_id,
    mv.name                                                          AS version,
    s.run_id,
    s.iteration,
    t.name                                                           AS task,
    s.prompt_style,
    count(*)                                                         AS n,
    (count(*) FILTER (WHERE s.correct))::float8 / count(*)           AS accuracy,
    (count(*) FILTER (WHERE s.correct_extracted))::float8 / count(*) AS accuracy_extracted
FROM scored s
JOIN model_versions mv ON mv.id = s.model_version_id
JOIN tasks t           ON t.id = s.task_id
GROUP BY s.model_version_id, mv.name, s.run_id, s.iteration, t.name, s.prompt_style;

COMMENT ON VIEW eval_accuracy IS 'Test accuracy per run and iteration (every result the run scored, reused ones included), or per model version for results outside any run; per task and prompt style.';
