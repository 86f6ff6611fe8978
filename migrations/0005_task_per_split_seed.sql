-- A task is stored once per train/test split. Runs with different seeds split the same
-- BIG-bench file differently (the reference seeds its permutation with the run's seed), so
-- each (name, split_seed) is its own row with its own examples; the same file under the
-- same name and seed is still stored once, and a different file under both is refused.

ALTER TABLE tasks DROP CONSTRAINT tasks_name_key;
ALTER TABLE tasks ADD CONSTRAINT tasks_name_split_seed_key UNIQUE (name, split_seed);

COMMENT ON TABLE tasks IS 'A BIG-bench task split under one seed, e.g. name ''tracking_shuffled_objects_three_objects'', path ''tracking_shuffled_objects/three_objects'', split_seed 1; one row per (name, split_seed).';
