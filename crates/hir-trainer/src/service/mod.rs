//! `hir.v1.TrainerService`: requests are validated into runs ([`validate`]), and each
//! running run gets a driver task ([`crate::driver`]); a run's view is built by
//! [`crate::run_view`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use hir_proto::pb::trainer_service_server::TrainerService;
use hir_proto::{convert, pb};
use hir_store::{NewRun, RunStatus, StoreError};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::driver::{self, Context};
use crate::error::{Result, TrainerError};
use crate::events::{version_to_pb, Events};

mod validate;

use validate::parse_run_id;
pub use validate::{MAX_NAME_BYTES, MAX_PATH_BYTES};

/// A run driven by this trainer.
struct Active {
    stop: watch::Sender<bool>,
    events: Events,
}

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Trainer {
    ctx: Arc<Context>,
    active: Arc<Mutex<HashMap<Uuid, Active>>>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").finish_non_exhaustive()
    }
}

impl Trainer {
    /// A service over the shared context.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            active: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The event channel of a run (created when nobody drives it here).
    fn events(&self, run_id: Uuid) -> Events {
        self.active()
            .entry(run_id)
            .or_insert_with(|| Active {
                stop: watch::channel(false).0,
                events: Events::new(1024),
            })
            .events
            .clone()
    }

    /// Starts driving a run in the background unless this trainer already drives it.
    pub fn spawn_driver(&self, run_id: Uuid) {
        let stop_rx = {
            let mut active = self.active();
            let entry = active.entry(run_id).or_insert_with(|| Active {
                stop: watch::channel(false).0,
                events: Events::new(1024),
            });
            if entry.stop.receiver_count() > 0 {
                return;
            }
            entry.stop.send_replace(false);
            entry.stop.subscribe()
        };
        let (ctx, events) = (Arc::clone(&self.ctx), self.events(run_id));
        tokio::spawn(async move {
            ctx.metrics.active_runs.inc();
            events.run_status(RunStatus::Running);
            // While `stop_rx` lives the run counts as driven here: it is dropped only after
            // the outcome is recorded, so a resume cannot start a second driver whose status
            // the first one's outcome would then overwrite.
            let outcome = driver::drive(&ctx, run_id, stop_rx.clone(), &events).await;
            driver::finish(&ctx.store, run_id, &outcome, &events).await;
            ctx.metrics.active_runs.dec();
            drop(stop_rx);
        });
    }

    /// The run as the API shows it.
    pub async fn run_to_pb(&self, run_id: Uuid) -> Result<pb::Run> {
        crate::run_view::run_view(&self.ctx.store, run_id).await
    }

    async fn start_run(&self, r: pb::StartRunRequest) -> Result<pb::Run> {
        let (run_id, policy, config, task_names) = self.validate_start(&r)?;
        if hir_core::relabel::trains_on_gold(&policy) {
            // The ceiling trains on the gold answers: every example needs one.
            for t in &task_names {
                let task = self.ctx.tasks.get(t)?;
                if let Some(i) = (0..task.examples.len())
                    .find(|&i| hir_store::catalog::gold(&task, i).trim().is_empty())
                {
                    return Err(TrainerError::invalid(
                        "policy",
                        format!(
                            "\"{policy}\" trains on gold answers, and example {i} of task {t:?} has none"
                        ),
                    ));
                }
            }
        }
        let architecture = self.check_model(&config.model).await?;
        self.check_lora(&config).await?;
        self.check_generators(&config, &architecture).await?;
        let store = &self.ctx.store;
        let name = if r.name.trim().is_empty() {
            format!("{policy} on {}", task_names.join(", "))
        } else {
            r.name.clone()
        };
        let run = store
            .create_run(&NewRun {
                id: run_id,
                name,
                policy,
                config: serde_json::to_value(&config)
                    .map_err(|e| TrainerError::FailedPrecondition(format!("run config: {e}")))?,
            })
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => TrainerError::AlreadyExists(m),
                other => other.into(),
            })?;
        if run.status == RunStatus::Pending {
            let seed = config.split_seed();
            let mut ids = Vec::new();
            for t in &task_names {
                let task = self.ctx.tasks.get(t)?;
                ids.push(hir_store::catalog::register(store, &task, seed).await?);
            }
            store.add_run_tasks(run_id, &ids).await?;
            store
                .set_run_status(run_id, RunStatus::Running, None)
                .await?;
            tracing::info!(%run_id, tasks = ?task_names, "run started");
            self.spawn_driver(run_id);
        }
        self.run_to_pb(run_id).await
    }

    async fn stop_run(&self, run_id: Uuid) -> Result<pb::Run> {
        let run = self.ctx.store.get_run(run_id).await?;
        // A run driven here stops after its current step commits; the driver records it.
        let driven = match self.active().get(&run_id) {
            Some(a) if a.stop.receiver_count() > 0 => {
                a.stop.send_replace(true);
                true
            }
            _ => false,
        };
        if !driven {
            match run.status {
                RunStatus::Running | RunStatus::Pending => {
                    self.ctx
                        .store
                        .set_run_status(run_id, RunStatus::Stopped, None)
                        .await?;
                }
                RunStatus::Stopped => {}
                other => {
                    return Err(TrainerError::FailedPrecondition(format!(
                        "run {run_id} is {other}; only a running run can be stopped"
                    )))
                }
            }
        }
        self.run_to_pb(run_id).await
    }

    async fn resume_run(&self, run_id: Uuid) -> Result<pb::Run> {
        let store = &self.ctx.store;
        let run = store.get_run(run_id).await?;
        match run.status {
            RunStatus::Stopped | RunStatus::Failed | RunStatus::Running => {}
            other => {
                return Err(TrainerError::FailedPrecondition(format!(
                    "run {run_id} is {other}; only a stopped or failed run can be resumed"
                )))
            }
        }
        // A failed iteration goes back to the last stage it completed.
        for it in store.list_iterations(run_id).await? {
            if it.status == hir_store::IterationStatus::Failed {
                let k = it.iteration;
                let back = if store
                    .get_model_version_by_name(&driver::version_name(run_id, k as u32))
                    .await
                    .is_ok()
                {
                    hir_store::IterationStatus::Trained
                } else if store
                    .training_summary(run_id)
                    .await?
                    .iter()
                    .any(|t| t.iteration == k && t.batches > 0)
                {
                    hir_store::IterationStatus::Training
                } else if k == 0 {
                    hir_store::IterationStatus::Evaluating
                } else {
                    hir_store::IterationStatus::Pending
                };
                store.resume_iteration(run_id, k, back).await?;
            }
        }
        store
            .set_run_status(run_id, RunStatus::Running, None)
            .await?;
        self.spawn_driver(run_id);
        self.run_to_pb(run_id).await
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl TrainerService for Trainer {
    async fn start_run(
        &self,
        request: Request<pb::StartRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        Ok(Response::new(
            Trainer::start_run(self, request.into_inner()).await?,
        ))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let run_id = parse_run_id("run_id", &request.get_ref().run_id)?;
        Ok(Response::new(self.run_to_pb(run_id).await?))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let run_id = parse_run_id("run_id", &request.get_ref().run_id)?;
        // Only runs that exist get an event channel.
        self.ctx
            .store
            .get_run(run_id)
            .await
            .map_err(TrainerError::from)?;
        // Subscribe before reading the snapshot so no event falls in between.
        let mut rx = self.events(run_id).subscribe();
        let snapshot = self.run_to_pb(run_id).await?;
        let this = self.clone();
        let stream = async_stream(move |tx| async move {
            let terminal = |s: i32| {
                s == pb::RunStatus::Done as i32
                    || s == pb::RunStatus::Failed as i32
                    || s == pb::RunStatus::Stopped as i32
            };
            let done = terminal(snapshot.status);
            let _ = tx
                .send(Ok(pb::RunEvent {
                    at: Some(convert::now()),
                    event: Some(pb::run_event::Event::Snapshot(snapshot)),
                }))
                .await;
            if done {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(event) => {
                        let end = matches!(event.event, Some(pb::run_event::Event::RunStatus(s)) if terminal(s));
                        if tx.send(Ok(event)).await.is_err() || end {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // A slow watcher skips ahead to the run as it is now.
                        let Ok(now) = this.run_to_pb(run_id).await else {
                            return;
                        };
                        let end = terminal(now.status);
                        let event = pb::RunEvent {
                            at: Some(convert::now()),
                            event: Some(pb::run_event::Event::Snapshot(now)),
                        };
                        if tx.send(Ok(event)).await.is_err() || end {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn stop_run(
        &self,
        request: Request<pb::StopRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let run_id = parse_run_id("run_id", &request.get_ref().run_id)?;
        Ok(Response::new(Trainer::stop_run(self, run_id).await?))
    }

    async fn resume_run(
        &self,
        request: Request<pb::ResumeRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let run_id = parse_run_id("run_id", &request.get_ref().run_id)?;
        Ok(Response::new(Trainer::resume_run(self, run_id).await?))
    }

    async fn list_checkpoints(
        &self,
        request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let run = &request.get_ref().run_id;
        let run_id = if run.trim().is_empty() {
            None
        } else {
            Some(parse_run_id("run_id", run)?)
        };
        let versions = self
            .ctx
            .store
            .list_model_versions(run_id)
            .await
            .map_err(TrainerError::from)?;
        let names: HashMap<i64, String> = versions.iter().map(|v| (v.id, v.name.clone())).collect();
        Ok(Response::new(pb::ListCheckpointsResponse {
            versions: versions
                .iter()
                .map(|v| {
                    version_to_pb(
                        v,
                        v.parent_id.and_then(|p| names.get(&p)).map(String::as_str),
                    )
                })
                .collect(),
        }))
    }
}

/// A stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::RunEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
