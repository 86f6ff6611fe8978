//! Integration tests of the relabel store against a real Postgres.
//!
//! Every test gets a fresh, migrated database from `#[sqlx::test]`; set
//! `DATABASE_URL` to a superuser URL (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`) to run them. All tests form
//! one binary; this file only lists the modules.

mod batches;
mod evals_feedback;
mod helpers;
mod iterations;
mod migrations;
mod runs_tasks;
mod samples;
mod training;
mod versions;
mod views;
