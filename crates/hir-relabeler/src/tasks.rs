//! BIG-bench tasks in the relabel store: registering a task (its examples, split, prompts
//! and gold answers) and loading a run's tasks back with their answers for scoring.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hir_core::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use hir_core::split::{Split, SplitSide};
use hir_core::task::{Catalog, Task, TaskKind};
use hir_store::{NewExample, NewTask, Store};

use crate::error::Result;

/// Stores `task` with its examples, split under `seed` and the sampler prompts; idempotent.
/// Returns the task's id in the store.
pub async fn register(store: &Store, task: &Task, seed: u32) -> Result<i64> {
    let split = Split::new(seed, task.examples.len());
    let sides = split.sides();
    let examples = task
        .examples
        .iter()
        .enumerate()
        .map(|(i, ex)| NewExample {
            idx: i as i32,
            split: match sides[i] {
                SplitSide::Train => hir_store::Split::Train,
                SplitSide::Test => hir_store::Split::Test,
            },
            prompt: Prompt::build(task, ex, DEFAULT_INSTRUCTION, PromptVariant::Sampler).text(),
            target: ex.answer.gold(),
        })
        .collect();
    let stored = store
        .upsert_task(&NewTask {
            name: task.name.clone(),
            path: task.path.clone(),
            kind: match task.kind {
                TaskKind::MultipleChoice => hir_store::TaskKind::MultipleChoice,
                TaskKind::Generative => hir_store::TaskKind::Generative,
            },
            split_seed: i64::from(seed),
            n_examples: task.examples.len() as i32,
            train_size: split.train.len() as i32,
            source_sha256: file_sha256(&task.file)?,
            examples,
        })
        .await?;
    Ok(stored.id)
}

fn file_sha256(path: &std::path::Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|source| hir_core::CoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A run's task: its id in the store and its examples with answers.
#[derive(Debug, Clone)]
pub struct RunTask {
    /// Id in the store.
    pub id: i64,
    /// The task as loaded from BIG-bench.
    pub task: Arc<Task>,
    /// The training split's example indices, in the reference's order.
    pub train: Vec<usize>,
}

/// The BIG-bench catalog with each task parsed once: Score answers from memory instead of
/// re-reading a task file (up to a few MB of JSON) on every call.
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

    /// The task named `name_or_path` (name or path), parsed on first use.
    pub fn get(&self, name_or_path: &str) -> Result<Arc<Task>> {
        let name = self.catalog.find(name_or_path)?.name.clone();
        if let Some(task) = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
        {
            return Ok(Arc::clone(task));
        }
        let task = Arc::new(self.catalog.load(&name)?);
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, Arc::clone(&task));
        Ok(task)
    }
}

/// Loads the tasks of a run from the store and the task cache.
pub async fn run_tasks(
    store: &Store,
    tasks: &TaskCache,
    run_id: uuid::Uuid,
    seed: u32,
) -> Result<Vec<RunTask>> {
    let ids = store.run_task_ids(run_id).await?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let row = store.get_task_by_id(id).await?;
        let task = tasks.get(&row.name)?;
        let train = Split::new(seed, task.examples.len()).train;
        out.push(RunTask { id, task, train });
    }
    Ok(out)
}
