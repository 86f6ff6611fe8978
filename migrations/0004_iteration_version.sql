-- The model version an iteration samples from, pinned when its sampling first starts.
--
-- Every sample of an iteration must come from this version: a sampler that resumes the
-- iteration (after a crash, or on another replica) sends the same version with each
-- request, and a generator serving anything else refuses the work until it is brought to
-- this version.

ALTER TABLE iterations
    ADD COLUMN model_version_id BIGINT NULL
        CONSTRAINT iterations_model_version_fk REFERENCES model_versions (id);

COMMENT ON COLUMN iterations.model_version_id IS 'The version the iteration samples from, set once when sampling first starts; NULL before.';
