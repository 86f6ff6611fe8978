//! The BIG-bench catalog as the store knows it: registering a task (its examples, split,
//! sampler prompts and gold answers), loading a run's tasks back for scoring, and the
//! model versions that generators serve without a checkpoint of ours (a starting model).
//!
//! The relabeler and the trainer both go through here, so a task is registered, split and
//! prompted the same way whichever service sees it first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hir_core::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use hir_core::split::Split;
use hir_core::task::{Catalog, Task};
use uuid::Uuid;

use crate::error::{Result, StoreError};
use crate::{ModelVersion, NewExample, NewModelVersion, NewTask, Store};

/// Stores `task` with its examples, split under `seed` and the sampler prompts; idempotent.
/// Returns the task's id in the store.
pub async fn register(store: &Store, task: &Task, seed: u32) -> Result<i64> {
    let split = Split::new(seed, task.examples.len());
    let sides = split.sides();
    let examples = task
        .examples
        .iter()
        .enumerate()
        .map(|(i, _)| NewExample {
            idx: i as i32,
            split: sides[i],
            prompt: sampler_prompt(task, i),
            target: gold(task, i),
        })
        .collect();
    let source_sha256 =
        hir_core::digest::sha256_file(&task.file).map_err(|source| hir_core::CoreError::Io {
            path: task.file.clone(),
            source,
        })?;
    let stored = store
        .upsert_task(&NewTask {
            name: task.name.clone(),
            path: task.path.clone(),
            kind: task.kind,
            split_seed: i64::from(seed),
            n_examples: task.examples.len() as i32,
            train_size: split.train.len() as i32,
            source_sha256,
            examples,
        })
        .await?;
    Ok(stored.id)
}

/// The sampler prompt of example `i` of `task` (the reference's prompt under the default
/// instruction): what registration stores and what the sampler sends.
pub fn sampler_prompt(task: &Task, i: usize) -> String {
    Prompt::build(
        task,
        &task.examples[i],
        DEFAULT_INSTRUCTION,
        PromptVariant::Sampler,
    )
    .text()
}

/// The gold answer of example `i` of `task`, as the reference compares against it: what
/// registration stores, what sampling relabels by and what training labels with.
pub fn gold(task: &Task, i: usize) -> String {
    task.examples[i].answer.gold()
}

/// A run's task: its id in the store and its examples with answers.
#[derive(Debug, Clone)]
pub struct RunTask {
    /// Id in the store.
    pub id: i64,
    /// The task as loaded from BIG-bench.
    pub task: Arc<Task>,
    /// The training split's example indices, in the reference's order (less the validation
    /// part, when the run holds one out).
    pub train: Vec<usize>,
    /// The validation part held out of the training split (empty unless the run's
    /// `validation_share` is set).
    pub validation: Vec<usize>,
}

impl RunTask {
    /// The sampler prompt of example `i`; see [`sampler_prompt`].
    pub fn sampler_prompt(&self, i: usize) -> String {
        sampler_prompt(&self.task, i)
    }

    /// The gold answer of example `i`; see [`gold`].
    pub fn gold(&self, i: usize) -> String {
        gold(&self.task, i)
    }
}

/// The BIG-bench catalog with each task parsed once: answers are scored from memory instead
/// of re-reading a task file (up to a few MB of JSON) on every call.
#[derive(Debug)]
pub struct TaskCache {
    catalog: Catalog,
    loaded: Mutex<HashMap<String, Arc<Task>>>,
}

impl TaskCache {
    /// An empty cache over `catalog`.
    pub fn new(catalog: Catalog) -> Self {
        Self {
            catalog,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The catalog the cache reads from.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The task named `name_or_path` (name or path), parsed on first use.
    pub fn get(&self, name_or_path: &str) -> Result<Arc<Task>> {
        let name = self.catalog.find(name_or_path)?.name.clone();
        if let Some(task) = self.lock().get(&name) {
            return Ok(Arc::clone(task));
        }
        let task = Arc::new(self.catalog.load(&name)?);
        self.lock().insert(name, Arc::clone(&task));
        Ok(task)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Task>>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Loads the tasks of a run from the store and the task cache, split under `seed` with
/// `validation_share` of each training split held out as validation.
pub async fn run_tasks(
    store: &Store,
    tasks: &TaskCache,
    run_id: Uuid,
    seed: u32,
    validation_share: f64,
) -> Result<Vec<RunTask>> {
    let ids = store.run_task_ids(run_id).await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let row = store.get_task_by_id(id).await?;
        let task = tasks.get(&row.name)?;
        let mut split = Split::new(seed, task.examples.len());
        let validation = split.hold_out_validation(validation_share);
        out.push(RunTask {
            id,
            task,
            train: split.train,
            validation,
        });
    }
    Ok(out)
}

/// The stored model version named `version`, registered on first sight: a model a
/// generator serves that no run of ours trained (the starting model). `sha256` is what the
/// generator reports for it; a placeholder of zeros stands in when it reports none.
pub async fn register_served_version(
    store: &Store,
    version: &str,
    sha256: &str,
) -> Result<ModelVersion> {
    match store.get_model_version_by_name(version).await {
        Ok(v) => Ok(v),
        Err(StoreError::NotFound { .. }) => {
            let sha256 = if hir_core::digest::is_sha256_hex(sha256) {
                sha256.to_owned()
            } else {
                "0".repeat(64)
            };
            store
                .register_model_version(&NewModelVersion {
                    name: version.to_owned(),
                    run_id: None,
                    iteration: None,
                    parent_id: None,
                    checkpoint_uri: format!("generator:{version}"),
                    sha256,
                    metrics: serde_json::json!({}),
                })
                .await
        }
        Err(e) => Err(e),
    }
}
