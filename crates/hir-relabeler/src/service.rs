//! `hir.v1.RelabelerService`: protocol types are validated into domain calls here.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use hir_core::relabel::Outcome;
use hir_core::task::{Catalog, TaskKind};
use hir_proto::pb;
use hir_proto::pb::relabeler_service_server::RelabelerService;
use hir_store::{IterationStatus, NewFeedback, Store};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::error::{RelabelerError, Result};
use crate::metrics::Metrics;
use crate::sampler::{Progress, Sampler, SamplerSettings};
use hir_runtime::generators::GeneratorPool;

/// Longest `source` and `external_id` of feedback, in bytes: together they are the stored
/// item's key, and a key must fit in an index entry.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest feedback instruction, in bytes.
pub const MAX_INSTRUCTION_BYTES: usize = 4 << 10;
/// Longest feedback query, in bytes.
pub const MAX_QUERY_BYTES: usize = 64 << 10;
/// Longest feedback answer, in bytes (it is quoted into relabeled instructions).
pub const MAX_ANSWER_BYTES: usize = 256;
/// Longest task name or path, in bytes.
pub const MAX_TASK_BYTES: usize = 256;

/// Checks one text field of a request before anything stores it: at most `max` bytes and
/// no NUL byte, which Postgres text cannot hold. `field` names it in the error.
fn check_text(field: impl FnOnce() -> String, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(RelabelerError::invalid(
            field(),
            format!("is {} bytes; at most {max}", value.len()),
        ));
    }
    if let Some(at) = value.find('\0') {
        return Err(RelabelerError::invalid(
            field(),
            format!("holds a NUL byte (at byte {at}); text cannot contain one"),
        ));
    }
    Ok(())
}

/// Limits on API input.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Longest output, in bytes.
    pub max_output_bytes: usize,
    /// Most feedback items per call.
    pub max_feedback_items: usize,
}

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Relabeler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Relabeler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relabeler").finish_non_exhaustive()
    }
}

struct Inner {
    sampler: Sampler,
    limits: ApiLimits,
    jobs: Mutex<HashMap<(Uuid, i32), watch::Sender<Progress>>>,
}

impl Relabeler {
    /// A service over a store, a task catalog and generators.
    pub fn new(
        store: Store,
        catalog: Catalog,
        generators: GeneratorPool,
        settings: SamplerSettings,
        limits: ApiLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let sampler = Sampler {
            store,
            tasks: hir_store::TaskCache::new(catalog),
            generators,
            settings,
            metrics,
        };
        Self {
            inner: Arc::new(Inner {
                sampler,
                limits,
                jobs: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Starts sampling `(run, iteration)` in the background unless it already runs here;
    /// returns its progress channel.
    pub fn spawn_sampling(&self, run_id: Uuid, iteration: i32) -> watch::Receiver<Progress> {
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = jobs.get(&(run_id, iteration)) {
            let running = matches!(
                tx.borrow().status,
                None | Some(IterationStatus::Pending | IterationStatus::Sampling)
            );
            if running {
                return tx.subscribe();
            }
        }
        let (tx, rx) = watch::channel(Progress::default());
        jobs.insert((run_id, iteration), tx.clone());
        drop(jobs);
        let inner = Arc::clone(&self.inner);
        let span = tracing::info_span!("sampling", %run_id, iteration);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = inner.sampler.sample_iteration(run_id, iteration, &tx).await;
                if let Err(err) = result {
                    tracing::error!(%err, "sampling failed; the iteration is marked failed");
                    let message = err.summary();
                    if let Err(store_err) = inner
                        .sampler
                        .store
                        .fail_iteration(run_id, iteration, &message)
                        .await
                    {
                        tracing::error!(%store_err, "could not mark the iteration failed");
                    }
                    tx.send_modify(|p| {
                        p.status = Some(IterationStatus::Failed);
                        p.error = message;
                    });
                }
            },
            span,
        ));
        rx
    }

    async fn status(&self, run_id: Uuid, iteration: i32) -> Result<pb::SamplingStatus> {
        let it = self
            .inner
            .sampler
            .store
            .get_iteration(run_id, iteration)
            .await?;
        let totals = self
            .inner
            .sampler
            .store
            .sample_totals(run_id, iteration)
            .await?;
        let progress = {
            let jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.get(&(run_id, iteration))
                .map(|tx| tx.borrow().clone())
                .unwrap_or_default()
        };
        Ok(to_pb(
            run_id,
            iteration,
            Some(it.status),
            &progress,
            Some(totals),
            it.error,
        ))
    }
}

fn to_pb(
    run_id: Uuid,
    iteration: i32,
    status: Option<IterationStatus>,
    p: &Progress,
    totals: Option<hir_store::SampleTotals>,
    error: Option<String>,
) -> pb::SamplingStatus {
    let status = status
        .or(p.status)
        .map(pb::IterationStatus::from)
        .unwrap_or(pb::IterationStatus::Unspecified);
    let (samples, correct, extracted) = match totals {
        Some(t) => (
            t.samples as u64,
            t.correct as u64,
            t.correct_extracted as u64,
        ),
        None => (p.samples, p.correct, p.correct_extracted),
    };
    pb::SamplingStatus {
        run_id: run_id.to_string(),
        iteration: iteration as u32,
        status: status as i32,
        model_version: p.model_version.clone(),
        prompts_total: p.prompts_total,
        prompts_done: p.prompts_done,
        samples,
        correct,
        correct_extracted: extracted,
        samples_per_second: p.samples_per_second,
        batches: p.batches,
        error: error
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| p.error.clone()),
    }
}

fn parse_run(run_id: &str) -> Result<Uuid> {
    Uuid::parse_str(run_id).map_err(|_| {
        RelabelerError::invalid(
            "run_id",
            format!("`{}` is not a UUID", hir_core::text_enum::bounded(run_id)),
        )
    })
}

fn parse_iteration(iteration: u32) -> Result<i32> {
    match i32::try_from(iteration) {
        Ok(i) if i >= 1 => Ok(i),
        _ => Err(RelabelerError::invalid(
            "iteration",
            format!("is {iteration}; sampled iterations start at 1"),
        )),
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::SamplingStatus, Status>> + Send>>;

#[tonic::async_trait]
impl RelabelerService for Relabeler {
    type WatchSamplingStream = StatusStream;

    async fn start_sampling(
        &self,
        request: Request<pb::StartSamplingRequest>,
    ) -> Result<Response<pb::SamplingStatus>, Status> {
        let req = request.into_inner();
        let run_id = parse_run(&req.run_id)?;
        let iteration = parse_iteration(req.iteration)?;
        self.inner
            .sampler
            .store
            .get_run(run_id)
            .await
            .map_err(RelabelerError::from)?;
        // The iteration exists once this call returns, so it can be watched at once.
        self.inner
            .sampler
            .store
            .ensure_iteration(run_id, iteration)
            .await
            .map_err(RelabelerError::from)?;
        let rx = self.spawn_sampling(run_id, iteration);
        let progress = rx.borrow().clone();
        let status = match self
            .inner
            .sampler
            .store
            .get_iteration(run_id, iteration)
            .await
        {
            Ok(it) => Some(it.status),
            Err(_) => progress.status.or(Some(IterationStatus::Pending)),
        };
        Ok(Response::new(to_pb(
            run_id, iteration, status, &progress, None, None,
        )))
    }

    async fn get_sampling(
        &self,
        request: Request<pb::GetSamplingRequest>,
    ) -> Result<Response<pb::SamplingStatus>, Status> {
        let req = request.into_inner();
        let (run_id, iteration) = (parse_run(&req.run_id)?, parse_iteration(req.iteration)?);
        Ok(Response::new(self.status(run_id, iteration).await?))
    }

    async fn watch_sampling(
        &self,
        request: Request<pb::GetSamplingRequest>,
    ) -> Result<Response<Self::WatchSamplingStream>, Status> {
        let req = request.into_inner();
        let (run_id, iteration) = (parse_run(&req.run_id)?, parse_iteration(req.iteration)?);
        let first = self.status(run_id, iteration).await?;
        let rx = {
            let jobs = self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.get(&(run_id, iteration)).map(|tx| tx.subscribe())
        };
        let (out, out_rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let active = first.status == pb::IterationStatus::Sampling as i32
                || first.status == pb::IterationStatus::Pending as i32;
            if out.send(Ok(first)).await.is_err() {
                return;
            }
            let Some(mut rx) = rx.filter(|_| active) else {
                return;
            };
            while rx.changed().await.is_ok() {
                let p = rx.borrow_and_update().clone();
                let done = !matches!(
                    p.status,
                    None | Some(IterationStatus::Pending | IterationStatus::Sampling)
                );
                if out
                    .send(Ok(to_pb(run_id, iteration, None, &p, None, None)))
                    .await
                    .is_err()
                    || done
                {
                    return;
                }
                // At most a few updates per second.
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let req = request.into_inner();
        check_text(
            || "output".into(),
            &req.output,
            self.inner.limits.max_output_bytes,
        )?;
        check_text(|| "task".into(), &req.task, MAX_TASK_BYTES)?;
        let task = self
            .inner
            .sampler
            .tasks
            .get(&req.task)
            .map_err(|e| RelabelerError::invalid("task", e.to_string()))?;
        let example = task
            .example(req.example_index as usize)
            .map_err(|e| RelabelerError::invalid("example_index", e.to_string()))?;
        let s = hir_core::score::score(&example.answer, &req.output);
        Ok(Response::new(pb::ScoreResponse {
            score: Some(pb::Score {
                exact: s.exact,
                extracted: s.extracted,
                predicted: s.predicted.unwrap_or_default(),
            }),
            gold: example.answer.gold(),
        }))
    }

    async fn submit_feedback(
        &self,
        request: Request<pb::SubmitFeedbackRequest>,
    ) -> Result<Response<pb::SubmitFeedbackResponse>, Status> {
        let req = request.into_inner();
        let limits = self.inner.limits;
        if req.source.trim().is_empty() {
            return Err(
                RelabelerError::invalid("source", "is required (who sends the feedback)").into(),
            );
        }
        check_text(|| "source".into(), &req.source, MAX_KEY_BYTES)?;
        let policy = hir_core::relabel::policy_by_name(&req.policy)
            .map_err(|e| RelabelerError::invalid("policy", e.to_string()))?;
        let run_id = if req.run_id.is_empty() {
            None
        } else {
            let id = parse_run(&req.run_id)?;
            self.inner
                .sampler
                .store
                .get_run(id)
                .await
                .map_err(RelabelerError::from)?;
            Some(id)
        };
        if req.items.is_empty() || req.items.len() > limits.max_feedback_items {
            return Err(RelabelerError::invalid(
                "items",
                format!("need 1 to {} items", limits.max_feedback_items),
            )
            .into());
        }
        let mut rows = Vec::with_capacity(req.items.len());
        let mut relabels = Vec::with_capacity(req.items.len());
        let mut skipped = 0u32;
        for (i, item) in req.items.iter().enumerate() {
            for (field, value, max) in [
                ("external_id", &item.external_id, MAX_KEY_BYTES),
                ("instruction", &item.instruction, MAX_INSTRUCTION_BYTES),
                ("query", &item.query, MAX_QUERY_BYTES),
                ("output", &item.output, limits.max_output_bytes),
            ] {
                if value.trim().is_empty() {
                    return Err(RelabelerError::invalid(
                        format!("items[{i}].{field}"),
                        "is required",
                    )
                    .into());
                }
                check_text(|| format!("items[{i}].{field}"), value, max)?;
            }
            check_text(
                || format!("items[{i}].answer"),
                &item.answer,
                MAX_ANSWER_BYTES,
            )?;
            let answer = Some(item.answer.as_str()).filter(|a| !a.is_empty());
            let kind =
                if answer.is_some_and(|a| a.len() == 3 && a.starts_with('(') && a.ends_with(')')) {
                    TaskKind::MultipleChoice
                } else {
                    TaskKind::Generative
                };
            let outcome = Outcome {
                kind,
                correct: item.correct,
                output: &item.output,
                predicted: answer,
            };
            match policy.relabel(&outcome) {
                Some(r) => {
                    relabels.push(pb::Relabel {
                        policy: policy.name().into(),
                        positive_instruction: r.positive.clone(),
                        negative_instruction: r.negative.clone(),
                    });
                    rows.push(NewFeedback {
                        source: req.source.clone(),
                        external_id: item.external_id.clone(),
                        run_id,
                        instruction: item.instruction.clone(),
                        query: item.query.clone(),
                        output: item.output.clone(),
                        feedback: serde_json::json!({ "correct": item.correct, "answer": item.answer }),
                        policy: policy.name().into(),
                        positive_instruction: r.positive,
                        negative_instruction: r.negative,
                    });
                }
                None => {
                    skipped += 1;
                    relabels.push(pb::Relabel::default());
                }
            }
        }
        let stored = if rows.is_empty() {
            0
        } else {
            self.inner
                .sampler
                .store
                .insert_feedback(&rows)
                .await
                .map_err(RelabelerError::from)? as u32
        };
        self.inner
            .sampler
            .metrics
            .feedback
            .inc_by(u64::from(stored));
        Ok(Response::new(pb::SubmitFeedbackResponse {
            stored,
            duplicates: rows.len() as u32 - stored,
            skipped,
            relabels,
        }))
    }
}
