//! The engine loop: admitting queued jobs into per-version decode batches, stepping every
//! batch one token, streaming finished completions, and activating new versions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use hir_model::{DecodeBatch, FinishReason, GenerationRequest};
use tokio::sync::mpsc;

use super::{new_batch, Activated, Batching, Completion, Control, EngineConfig, Job, Serving};
use crate::error::{GeneratorError, Result};
use crate::metrics::Metrics;

/// How long the engine waits without work before returning freed memory to the system.
const IDLE_BEFORE_RELEASE: std::time::Duration = std::time::Duration::from_secs(5);

/// One version's model and its running batches (none when idle).
struct Slot {
    serving: Serving,
    batches: Vec<DecodeBatch>,
}

impl Slot {
    fn new(serving: Serving) -> Self {
        Self {
            serving,
            batches: Vec::new(),
        }
    }

    fn running(&self) -> usize {
        self.batches.iter().map(DecodeBatch::len).sum()
    }

    /// Drops the sequences of requests `keep` rejects, then the batches left empty.
    fn retain_requests(&mut self, keep: impl Fn(u64) -> bool) -> hir_model::Result<()> {
        let mut result = Ok(());
        for batch in &mut self.batches {
            if let Err(err) = batch.retain_requests(&keep) {
                result = Err(err);
            }
        }
        self.batches.retain(|b| !b.is_empty());
        result
    }

    /// Prefills `requests` into the running batches as `batching` says.
    fn admit(
        &mut self,
        batching: Batching,
        requests: &[GenerationRequest],
        streams: &[u64],
    ) -> hir_model::Result<()> {
        let model = Arc::clone(&self.serving.model);
        match batching {
            Batching::Shared => {
                if self.batches.is_empty() {
                    self.batches.push(new_batch(&model));
                }
                self.batches[0].admit(model.model(), requests, streams)
            }
            Batching::PerPrompt => {
                for (request, stream) in requests.iter().zip(streams) {
                    let mut batch = new_batch(&model);
                    if let Err(err) =
                        batch.admit(model.model(), std::slice::from_ref(request), &[*stream])
                    {
                        let ids: HashSet<u64> = requests.iter().map(|r| r.id).collect();
                        let _ = self.retain_requests(|id| !ids.contains(&id));
                        return Err(err);
                    }
                    self.batches.push(batch);
                }
                Ok(())
            }
        }
    }
}

struct ActiveJob {
    job: Job,
    remaining: usize,
    version: Arc<str>,
    groups: Vec<u64>,
}

pub(super) struct Engine {
    config: EngineConfig,
    jobs: mpsc::Receiver<Job>,
    control: mpsc::UnboundedReceiver<Control>,
    shared: Arc<RwLock<Serving>>,
    /// Oldest first; the last one is current.
    slots: Vec<Slot>,
    /// A job taken from the queue that did not fit yet.
    pending: Option<Job>,
    active: HashMap<u64, ActiveJob>,
    /// Sequence-group id (one per prompt) → (job id, prompt index).
    groups: HashMap<u64, (u64, u32)>,
    next_id: u64,
    served_versions: HashSet<Arc<str>>,
    draining: bool,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// An engine serving what `shared` holds, fed by `jobs` and `control`.
    pub(super) fn new(
        config: EngineConfig,
        jobs: mpsc::Receiver<Job>,
        control: mpsc::UnboundedReceiver<Control>,
        shared: Arc<RwLock<Serving>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let serving = shared.read().unwrap_or_else(|p| p.into_inner()).clone();
        Self {
            config,
            jobs,
            control,
            shared,
            slots: vec![Slot::new(serving)],
            pending: None,
            active: HashMap::new(),
            groups: HashMap::new(),
            next_id: 0,
            served_versions: HashSet::new(),
            draining: false,
            metrics,
        }
    }

    /// Runs until every handle is gone and the last job has finished.
    pub(super) fn run(mut self) {
        self.served_versions
            .insert(Arc::clone(&self.current().serving.version));
        let Ok(idle) = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        else {
            tracing::error!("cannot build the engine's wait runtime");
            return;
        };
        loop {
            while let Ok(control) = self.control.try_recv() {
                self.handle(control);
            }
            self.admit();
            if self.running_sequences() > 0 {
                self.drop_cancelled();
                self.step();
                continue;
            }
            self.release_idle_slots();
            if self.pending.is_some() {
                continue;
            }
            // Idle: wait for work or control. After five seconds without any, hand the memory
            // of freed KV caches back (not between the requests of a burst, which would
            // allocate it again at once).
            let woke = idle.block_on(async {
                let wait = async {
                    tokio::select! {
                        c = self.control.recv() => c.map(Wake::Control),
                        j = self.jobs.recv() => j.map(Wake::Job),
                    }
                };
                tokio::pin!(wait);
                match tokio::time::timeout(IDLE_BEFORE_RELEASE, &mut wait).await {
                    Ok(woke) => woke,
                    Err(_) => {
                        hir_runtime::memory::release_free();
                        wait.await
                    }
                }
            });
            match woke {
                Some(Wake::Control(c)) => self.handle(c),
                Some(Wake::Job(j)) => self.pending = Some(j),
                None => {
                    tracing::info!("engine stopping: no more handles");
                    return;
                }
            }
        }
    }

    fn current(&self) -> &Slot {
        self.slots
            .last()
            .expect("the engine always has a current slot")
    }

    fn running_sequences(&self) -> usize {
        self.slots.iter().map(Slot::running).sum()
    }

    fn running_tokens(&self) -> usize {
        self.active.values().map(|a| a.job.tokens()).sum()
    }

    fn handle(&mut self, control: Control) {
        match control {
            Control::Activate {
                serving,
                expected,
                reply,
            } => {
                let result = self.activate(serving, expected);
                let _ = reply.send(result);
            }
            Control::LogProbs {
                items,
                expected,
                reply,
            } => {
                let _ = reply.send(self.logprobs(&items, expected.as_deref()));
            }
            Control::Drain { abort } => {
                self.draining = true;
                if let Some(job) = self.pending.take() {
                    let _ = job.out.send(Err(GeneratorError::EngineStopped));
                }
                while let Ok(job) = self.jobs.try_recv() {
                    let _ = job.out.send(Err(GeneratorError::EngineStopped));
                }
                if abort {
                    for (_, active) in self.active.drain() {
                        let _ = active.job.out.send(Err(GeneratorError::EngineStopped));
                    }
                    self.groups.clear();
                    for slot in &mut self.slots {
                        let _ = slot.retain_requests(|_| false);
                    }
                }
            }
        }
    }

    fn activate(&mut self, serving: Serving, expected: Option<String>) -> Result<Activated> {
        let previous = Arc::clone(&self.current().serving.version);
        if let Some(expected) = expected.filter(|e| !e.is_empty()) {
            if *expected != *previous {
                return Err(GeneratorError::FailedPrecondition(format!(
                    "expected version `{expected}` to be serving, but `{previous}` is; another swap happened first"
                )));
            }
        }
        if self.served_versions.contains(&serving.version) {
            return Err(GeneratorError::invalid(
                "version",
                format!(
                    "`{}` was served before; every swap needs a new version name",
                    serving.version
                ),
            ));
        }
        self.served_versions.insert(Arc::clone(&serving.version));
        self.metrics.set_version(&serving.version);
        if let Ok(mut shared) = self.shared.write() {
            *shared = serving.clone();
        }
        self.slots.push(Slot::new(serving));
        self.release_idle_slots();
        Ok(Activated { previous })
    }

    fn admit(&mut self) {
        if self.draining {
            // Shutting down: whatever still arrives is refused rather than left waiting.
            let refused = self
                .pending
                .take()
                .into_iter()
                .chain(std::iter::from_fn(|| self.jobs.try_recv().ok()));
            for job in refused.collect::<Vec<_>>() {
                let _ = job.out.send(Err(GeneratorError::EngineStopped));
            }
            return;
        }
        let mut admitted: Vec<(u64, Job)> = Vec::new();
        let (mut tokens, mut seqs) = (self.running_tokens(), self.running_sequences());
        let current = Arc::clone(&self.current().serving.version);
        loop {
            let job = match self.pending.take() {
                Some(job) => job,
                None => match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            if job.out.is_closed() {
                continue; // cancelled while queued
            }
            if let Some(expected) = job.expected_version.as_deref().filter(|e| !e.is_empty()) {
                if expected != &*current {
                    let _ = job.out.send(Err(GeneratorError::VersionMismatch {
                        expected: expected.to_string(),
                        serving: current.to_string(),
                    }));
                    continue;
                }
            }
            let fits = tokens + job.tokens() <= self.config.token_budget
                && seqs + job.sequences() <= self.config.max_batch_sequences;
            if !fits && (seqs > 0 || !admitted.is_empty()) {
                self.pending = Some(job);
                break;
            }
            tokens += job.tokens();
            seqs += job.sequences();
            self.next_id += 1;
            admitted.push((self.next_id, job));
        }
        self.metrics
            .queue_depth
            .set((self.jobs.len() + usize::from(self.pending.is_some())) as i64);
        if admitted.is_empty() {
            return;
        }
        let mut requests = Vec::new();
        let mut streams = Vec::new();
        let mut job_groups = Vec::with_capacity(admitted.len());
        for (job_id, job) in &admitted {
            let mut groups = Vec::with_capacity(job.prompts.len());
            for (p, prompt) in job.prompts.iter().enumerate() {
                self.next_id += 1;
                let group = self.next_id;
                self.groups.insert(group, (*job_id, p as u32));
                groups.push(group);
                requests.push(GenerationRequest {
                    id: group,
                    prompt_ids: prompt.clone(),
                    params: job.params.clone(),
                });
                // The prompt index seeds the sequence's generator with the request's seed, so a
                // sample does not depend on which other requests share the batch.
                streams.push(p as u64);
            }
            job_groups.push(groups);
        }
        let batching = self.config.batching;
        let slot = self.slots.last_mut().expect("current slot");
        let result = slot.admit(batching, &requests, &streams);
        let now = Instant::now();
        for ((job_id, job), groups) in admitted.into_iter().zip(job_groups) {
            if let Err(err) = &result {
                let _ = job.out.send(Err(GeneratorError::FailedPrecondition(format!(
                    "prefill failed: {err}"
                ))));
                for g in groups {
                    self.groups.remove(&g);
                }
                continue;
            }
            self.metrics
                .time_to_first_token
                .observe((now - job.enqueued).as_secs_f64());
            job.span.in_scope(
                || tracing::debug!(sequences = job.sequences(), version = %current, "admitted"),
            );
            let remaining = job.sequences();
            self.active.insert(
                job_id,
                ActiveJob {
                    job,
                    remaining,
                    version: Arc::clone(&current),
                    groups,
                },
            );
        }
        let running = self.running_sequences() as i64;
        self.metrics.running_sequences.set(running);
        if running > self.metrics.peak_running_sequences.get() {
            self.metrics.peak_running_sequences.set(running);
        }
    }

    fn drop_cancelled(&mut self) {
        let cancelled: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, a)| a.job.out.is_closed())
            .map(|(id, _)| *id)
            .collect();
        if cancelled.is_empty() {
            return;
        }
        let mut dead_groups = HashSet::new();
        for id in cancelled {
            if let Some(active) = self.active.remove(&id) {
                active
                    .job
                    .span
                    .in_scope(|| tracing::info!("client cancelled; freeing its sequences"));
                for g in active.groups {
                    self.groups.remove(&g);
                    dead_groups.insert(g);
                }
            }
        }
        for slot in &mut self.slots {
            if let Err(err) = slot.retain_requests(|id| !dead_groups.contains(&id)) {
                tracing::error!(%err, "dropping cancelled sequences failed");
            }
        }
        self.metrics
            .running_sequences
            .set(self.running_sequences() as i64);
    }

    fn step(&mut self) {
        let started = Instant::now();
        let mut tokens = 0usize;
        let mut finished = Vec::new();
        let mut failed_groups = Vec::new();
        for slot in &mut self.slots {
            let model = Arc::clone(&slot.serving.model);
            for batch in &mut slot.batches {
                tokens += batch.len();
                match batch.step(model.model(), model.tokenizer()) {
                    Ok(done) => finished.extend(done),
                    Err(err) => {
                        tracing::error!(%err, version = %slot.serving.version, "decode step failed");
                        failed_groups.extend(batch.request_ids());
                        let _ = batch.retain_requests(|_| false);
                    }
                }
            }
            slot.batches.retain(|b| !b.is_empty());
        }
        self.metrics.generated_tokens.inc_by(tokens as u64);
        let elapsed = started.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            self.metrics.tokens_per_second.set(tokens as f64 / elapsed);
        }
        for g in failed_groups {
            if let Some((job_id, _)) = self.groups.remove(&g) {
                if let Some(active) = self.active.remove(&job_id) {
                    let _ = active.job.out.send(Err(GeneratorError::FailedPrecondition(
                        "decoding failed; see server logs".into(),
                    )));
                }
            }
        }
        for seq in finished {
            let Some(&(job_id, prompt_index)) = self.groups.get(&seq.request_id) else {
                continue;
            };
            let Some(active) = self.active.get_mut(&job_id) else {
                continue;
            };
            let mut token_ids = seq.token_ids;
            let mut logprobs = seq.logprobs;
            if seq.finish_reason == FinishReason::Eos {
                token_ids.pop();
                logprobs.pop();
            }
            let completion = Completion {
                prompt_index,
                sample_index: seq.sample_index as u32,
                model_version: Arc::clone(&active.version),
                finish_reason: seq.finish_reason,
                text: seq.text,
                token_ids,
                logprobs: if active.job.return_logprobs {
                    logprobs
                } else {
                    Vec::new()
                },
                prompt_tokens: active.job.prompts[prompt_index as usize].len() as u32,
            };
            // A closed receiver is a cancellation, handled before the next step.
            let _ = active.job.out.send(Ok(completion));
            self.metrics.completions.inc();
            active.remaining -= 1;
            if active.remaining == 0 {
                if let Some(done) = self.active.remove(&job_id) {
                    for g in &done.groups {
                        self.groups.remove(g);
                    }
                    done.job.span.in_scope(|| {
                        tracing::debug!(
                            elapsed_ms = done.job.enqueued.elapsed().as_millis() as u64,
                            "request finished"
                        )
                    });
                }
            }
        }
        self.release_idle_slots();
        self.metrics
            .running_sequences
            .set(self.running_sequences() as i64);
    }

    /// Drops older versions with nothing left running; the current one always stays.
    fn release_idle_slots(&mut self) {
        let last = self.slots.len() - 1;
        let mut index = 0;
        self.slots.retain(|s| {
            let keep = index == last || s.running() > 0;
            index += 1;
            keep
        });
    }

    fn logprobs(
        &self,
        items: &[(Vec<u32>, Vec<u32>)],
        expected: Option<&str>,
    ) -> Result<(Arc<str>, Vec<Vec<f32>>)> {
        let slot = self.current();
        let version = Arc::clone(&slot.serving.version);
        if let Some(expected) = expected.filter(|e| !e.is_empty()) {
            if expected != &*version {
                return Err(GeneratorError::VersionMismatch {
                    expected: expected.to_string(),
                    serving: version.to_string(),
                });
            }
        }
        let model = slot.serving.model.model();
        let out = items
            .iter()
            .map(|(prompt, continuation)| model.continuation_logprobs(prompt, continuation))
            .collect::<hir_model::Result<Vec<_>>>()?;
        Ok((version, out))
    }
}

enum Wake {
    Control(Control),
    Job(Job),
}
