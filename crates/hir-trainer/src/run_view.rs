//! A run as the API shows it (`hir.v1.Run`), built from the store's rows: its iterations
//! with their sample totals, training summary and every evaluation the run scored.

use std::collections::{BTreeMap, HashMap};

use hir_proto::{convert, pb};
use hir_store::{RunEvalItem, Store};
use uuid::Uuid;

use crate::error::Result;

/// The run `run_id` as the API shows it.
pub async fn run_view(store: &Store, run_id: Uuid) -> Result<pb::Run> {
    let run = store.get_run(run_id).await?;
    let config = run.config()?;
    let mut tasks = Vec::new();
    for id in store.run_task_ids(run_id).await? {
        tasks.push(store.get_task_by_id(id).await?.name);
    }
    let training = store.training_summary(run_id).await?;
    let mut evals = evaluations(store.run_eval_items(run_id).await?);
    let mut iterations = Vec::new();
    for it in store.list_iterations(run_id).await? {
        let totals = store.sample_totals(run_id, it.iteration).await?;
        let t = training.iter().find(|t| t.iteration == it.iteration);
        let (version, eval) = evals.remove(&it.iteration).unwrap_or_default();
        let share = |n: i64| {
            if totals.samples > 0 {
                n as f64 / totals.samples as f64
            } else {
                0.0
            }
        };
        iterations.push(pb::IterationSummary {
            iteration: it.iteration as u32,
            status: pb::IterationStatus::from(it.status) as i32,
            model_version: version,
            samples: totals.samples as u64,
            sample_accuracy: share(totals.correct),
            sample_accuracy_extracted: share(totals.correct_extracted),
            prompts: totals.prompts as u64,
            prompts_correct: totals.prompts_correct as u64,
            prompts_correct_extracted: totals.prompts_correct_extracted as u64,
            train_loss: t.and_then(|t| t.mean_loss).unwrap_or(0.0),
            steps: t.map_or(0, |t| t.steps as u64),
            eval,
            error: it.error.unwrap_or_default(),
        });
    }
    Ok(pb::Run {
        run_id: run.id.to_string(),
        name: run.name,
        status: pb::RunStatus::from(run.status) as i32,
        tasks,
        model: config.model.clone(),
        policy: run.policy,
        hyperparameters: Some(convert::hyperparameters(&config)),
        current_iteration: iterations.last().map_or(0, |i| i.iteration),
        error: run.error.unwrap_or_default(),
        created_at: Some(convert::timestamp(run.created_at)),
        updated_at: Some(convert::timestamp(run.updated_at)),
        iterations,
    })
}

/// A run's scored items (ordered by iteration, task and example) folded into each
/// iteration's evaluated version and per-task accuracy, tasks in name order.
fn evaluations(items: Vec<RunEvalItem>) -> HashMap<i32, (String, Vec<pb::TaskAccuracy>)> {
    let mut by_task: BTreeMap<(i32, String), (String, Vec<RunEvalItem>)> = BTreeMap::new();
    for item in items {
        by_task
            .entry((item.iteration, item.task.clone()))
            .or_insert_with(|| (item.version.clone(), Vec::new()))
            .1
            .push(item);
    }
    let mut out: HashMap<i32, (String, Vec<pb::TaskAccuracy>)> = HashMap::new();
    for ((iteration, task), (version, items)) in by_task {
        let n = items.len();
        let indices = |f: fn(&RunEvalItem) -> bool| -> Vec<u32> {
            items
                .iter()
                .filter(|i| f(i))
                .map(|i| i.example_idx as u32)
                .collect()
        };
        let correct_examples = indices(|i| i.correct);
        let correct_extracted_examples = indices(|i| i.correct_extracted);
        let mut predicted_counts: HashMap<String, u32> = HashMap::new();
        for i in &items {
            let answer = i.predicted.clone().unwrap_or_else(|| "(none)".into());
            *predicted_counts.entry(answer).or_default() += 1;
        }
        let entry = out
            .entry(iteration)
            .or_insert_with(|| (version, Vec::new()));
        entry.1.push(pb::TaskAccuracy {
            task,
            examples: n as u32,
            exact: correct_examples.len() as f64 / n as f64,
            extracted: correct_extracted_examples.len() as f64 / n as f64,
            predicted_counts,
            correct_examples,
            correct_extracted_examples,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(iteration: i32, task: &str, idx: i32, exact: bool, extracted: bool) -> RunEvalItem {
        RunEvalItem {
            iteration,
            version: format!("v{iteration}"),
            task: task.into(),
            example_idx: idx,
            correct: exact,
            correct_extracted: extracted,
            predicted: extracted.then(|| "3".to_string()),
        }
    }

    #[test]
    fn items_fold_into_per_iteration_task_accuracy() {
        let view = evaluations(vec![
            item(0, "a", 1, false, true),
            item(0, "a", 4, false, false),
            item(0, "b", 2, true, true),
            item(1, "a", 1, true, true),
            item(1, "a", 4, false, true),
        ]);
        let (version, eval) = &view[&0];
        assert_eq!(version, "v0");
        assert_eq!(eval.len(), 2);
        assert_eq!((eval[0].task.as_str(), eval[0].examples), ("a", 2));
        assert_eq!((eval[0].exact, eval[0].extracted), (0.0, 0.5));
        assert_eq!(eval[0].correct_extracted_examples, [1]);
        assert_eq!(eval[0].predicted_counts["(none)"], 1);
        assert_eq!(eval[0].predicted_counts["3"], 1);
        assert_eq!(eval[1].correct_examples, [2]);
        let (version, eval) = &view[&1];
        assert_eq!(version, "v1");
        assert_eq!(eval[0].correct_examples, [1]);
        assert_eq!(eval[0].correct_extracted_examples, [1, 4]);
        assert_eq!(eval[0].predicted_counts["3"], 2);
    }
}
