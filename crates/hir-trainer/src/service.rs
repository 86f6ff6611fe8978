//! `hir.v1.TrainerService`: requests are validated into runs here, and each running run
//! gets a driver task ([`crate::driver`]).

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hir_core::run::RunConfig;
use hir_core::text_enum::bounded;
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

fn parse_run_id(field: &str, s: &str) -> Result<Uuid> {
    Uuid::parse_str(s.trim())
        .map_err(|e| TrainerError::invalid(field, format!("{:?} is not a UUID: {e}", bounded(s))))
}

/// Longest run name and task name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest model path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// How long StartRun waits for each generator's GetModelInfo.
const GENERATOR_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks one text field of a request: at most `max` bytes and no NUL byte (which the
/// store cannot hold). `field` names it in the error.
fn check_text(field: impl FnOnce() -> String, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(TrainerError::invalid(
            field(),
            format!("is {} bytes; at most {max}", value.len()),
        ));
    }
    if let Some(at) = value.find('\0') {
        return Err(TrainerError::invalid(
            field(),
            format!("holds a NUL byte (at byte {at}); text cannot contain one"),
        ));
    }
    Ok(())
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

    /// Validates a StartRun request into (run id, name, policy, config, task names).
    fn validate_start(
        &self,
        r: &pb::StartRunRequest,
    ) -> Result<(Uuid, String, RunConfig, Vec<String>)> {
        let run_id = if r.run_id.trim().is_empty() {
            Uuid::new_v4()
        } else {
            parse_run_id("run_id", &r.run_id)?
        };
        if r.tasks.is_empty() {
            return Err(TrainerError::invalid(
                "tasks",
                "name at least one BIG-bench task, e.g. tracking_shuffled_objects_three_objects",
            ));
        }
        check_text(|| "name".into(), &r.name, MAX_NAME_BYTES)?;
        let mut names = Vec::with_capacity(r.tasks.len());
        for (i, t) in r.tasks.iter().enumerate() {
            check_text(|| format!("tasks[{i}]"), t, MAX_NAME_BYTES)?;
            let task = self
                .ctx
                .tasks
                .get(t)
                .map_err(|e| TrainerError::invalid(format!("tasks[{i}]"), e.to_string()))?;
            names.push(task.name.clone());
        }
        if r.model.trim().is_empty() {
            return Err(TrainerError::invalid(
                "model",
                "give the starting model: a Hugging Face folder or a .gguf file the trainer can read",
            ));
        }
        check_text(|| "model".into(), &r.model, MAX_PATH_BYTES)?;
        let model = Path::new(&r.model);
        if !(model.is_dir() && model.join("config.json").is_file()
            || model.is_file() && model.extension().is_some_and(|e| e == "gguf"))
        {
            return Err(TrainerError::invalid(
                "model",
                format!(
                    "{:?} is neither a model folder with config.json nor a .gguf file on the \
                     trainer's disk",
                    bounded(&r.model)
                ),
            ));
        }
        let policy = if r.policy.is_empty() {
            "hir"
        } else {
            r.policy.as_str()
        };
        hir_core::relabel::policy_by_name(policy)
            .map_err(|e| TrainerError::invalid("policy", e.to_string()))?;
        let config = convert::run_config(&r.model, r.hyperparameters.as_ref())
            .and_then(|c| c.validate().map(|()| c))
            .map_err(|e| match e {
                hir_core::CoreError::InvalidArgument { field, reason } => {
                    TrainerError::invalid(format!("hyperparameters.{field}"), reason)
                }
                other => TrainerError::invalid("hyperparameters", other.to_string()),
            })?;
        Ok((run_id, policy.to_string(), config, names))
    }

    /// The run as the API shows it.
    pub async fn run_to_pb(&self, run_id: Uuid) -> Result<pb::Run> {
        crate::run_view::run_view(&self.ctx.store, run_id).await
    }

    /// Reads the starting model's header (see [`probe_model`]); returns its architecture.
    async fn check_model(&self, model: &str) -> Result<String> {
        let path = std::path::PathBuf::from(model);
        tokio::task::spawn_blocking(move || hir_model::probe::probe(&path))
            .await
            .map_err(|e| TrainerError::Internal(format!("checking the model: {e}")))?
            .map_err(|reason| {
                TrainerError::invalid("model", format!("{:?} {reason}", bounded(model)))
            })
    }

    /// With `lora_rank` set, checks the adapters fit the starting model: a Llama-family
    /// model whose targeted projections are at least that wide.
    async fn check_lora(&self, config: &RunConfig) -> Result<()> {
        if config.lora_rank == 0 {
            return Ok(());
        }
        let lora = hir_model::arch::lora::LoraConfig::from_knobs(
            config.lora_rank,
            config.lora_alpha,
            &config.lora_targets,
        );
        let path = std::path::PathBuf::from(&config.model);
        let checked = tokio::task::spawn_blocking(move || {
            lora.and_then(|l| hir_model::probe::check_lora(&path, &l))
        })
        .await
        .map_err(|e| TrainerError::Internal(format!("checking the LoRA settings: {e}")))?;
        match checked {
            Ok(()) => Ok(()),
            Err(hir_model::ModelError::InvalidAdapter { field, reason }) => Err(
                TrainerError::invalid(format!("hyperparameters.{field}"), reason),
            ),
            Err(other) => Err(TrainerError::invalid(
                "model",
                format!("{:?}: {}", bounded(&config.model), other),
            )),
        }
    }

    /// Asks every generator what it serves and refuses a run it cannot sample or
    /// evaluate: another architecture than the starting model's, more new tokens or
    /// samples per prompt than it allows, a top-k beyond its vocabulary. A generator that
    /// does not answer is passed over (it is brought to the run's version when it is back);
    /// when none answers the call is UNAVAILABLE.
    async fn check_generators(&self, config: &RunConfig, architecture: &str) -> Result<()> {
        let remotes = &self.ctx.remotes;
        remotes.refresh_generators().await;
        let mut unanswered = None;
        let mut answered = 0;
        for g in remotes.generators().iter() {
            let info = match tokio::time::timeout(GENERATOR_CHECK_TIMEOUT, remotes.model_info(g))
                .await
            {
                Ok(Ok(info)) => info,
                Ok(Err(e @ (TrainerError::Unreachable { .. } | TrainerError::Remote { .. }))) => {
                    tracing::warn!(generator = %g.address, error = %e, "a generator does not answer at StartRun");
                    unanswered = Some(e);
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    unanswered = Some(TrainerError::Unreachable {
                        service: format!("generator {}", g.address),
                        message: format!(
                            "no answer to GetModelInfo within {} s",
                            GENERATOR_CHECK_TIMEOUT.as_secs()
                        ),
                    });
                    continue;
                }
            };
            answered += 1;
            let at = &g.address;
            if !info.architecture.is_empty() && info.architecture != architecture {
                return Err(TrainerError::invalid(
                    "model",
                    format!(
                        "is a {architecture} model but generator {at} serves a {} model \
                         (version {}); start from a {} model or serve a {architecture} one",
                        info.architecture, info.version, info.architecture
                    ),
                ));
            }
            // A generator's bound of 0 means it sets none.
            let limits = info.limits.unwrap_or_default();
            for (field, value, bound, what) in [
                (
                    "hyperparameters.max_new_tokens",
                    config.max_new_tokens,
                    limits.max_new_tokens,
                    format!("generator {at} allows at most {}", limits.max_new_tokens),
                ),
                (
                    "hyperparameters.samples_per_prompt",
                    config.samples_per_prompt,
                    limits.max_n,
                    format!("generator {at} samples at most {} per prompt", limits.max_n),
                ),
                (
                    "hyperparameters.max_new_tokens",
                    config.max_new_tokens,
                    info.context_length,
                    format!(
                        "the model generator {at} serves has a context of {} tokens",
                        info.context_length
                    ),
                ),
                (
                    "hyperparameters.top_k",
                    config.top_k,
                    info.vocab_size,
                    format!(
                        "the vocabulary of the model generator {at} serves has {} tokens",
                        info.vocab_size
                    ),
                ),
            ] {
                if bound > 0 && value > bound {
                    return Err(TrainerError::invalid(field, format!("is {value}; {what}")));
                }
            }
        }
        match unanswered {
            Some(e) if answered == 0 => Err(e),
            _ => Ok(()),
        }
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
