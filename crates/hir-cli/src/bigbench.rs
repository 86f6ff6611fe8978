//! `hir tasks …` and `hir score`: the core's view of BIG-bench, from the shell.

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use hir_core::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use hir_core::score::score as score_output;
use hir_core::split::Split;
use hir_core::task::{Catalog, Task};
use serde_json::json;

use crate::BigBench;

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// The tasks found, with example counts and kinds.
    List {
        #[command(flatten)]
        bigbench: BigBench,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The reference's 80/20 split as example indices.
    Split {
        #[command(flatten)]
        task: TaskArg,
        /// Seed of numpy's `RandomState` permutation (the reference uses 1).
        #[arg(long, default_value_t = 1)]
        seed: u32,
        /// Print `{"train":[...],"test":[...]}`.
        #[arg(long)]
        json: bool,
    },
    /// The prompt of one example and its gold answer.
    Prompt {
        #[command(flatten)]
        task: TaskArg,
        /// Example index.
        #[arg(long)]
        index: usize,
        /// The sampler's prompt or the evaluator's (one newline longer).
        #[arg(long, value_enum, default_value_t = Variant::Sampler)]
        variant: Variant,
        /// The instruction line.
        #[arg(long, default_value = DEFAULT_INSTRUCTION)]
        instruction: String,
        /// Print `{"prompt":...,"target":...}`.
        #[arg(long)]
        json: bool,
    },
}

/// A task in a BIG-bench folder.
#[derive(Debug, Args)]
pub struct TaskArg {
    #[command(flatten)]
    bigbench: BigBench,
    /// Task name (`tracking_shuffled_objects_three_objects`) or path
    /// (`tracking_shuffled_objects/three_objects`).
    #[arg(long)]
    task: String,
}

impl TaskArg {
    fn load(&self) -> Result<Task> {
        Ok(Catalog::discover(&self.bigbench.dir)?.load(&self.task)?)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Variant {
    Sampler,
    Eval,
}

impl From<Variant> for PromptVariant {
    fn from(v: Variant) -> Self {
        match v {
            Variant::Sampler => PromptVariant::Sampler,
            Variant::Eval => PromptVariant::Eval,
        }
    }
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    task: TaskArg,
    /// Example index.
    #[arg(long)]
    index: usize,
    /// The model's output.
    #[arg(long)]
    output: String,
    /// Print `{"exact":bool,"extracted":bool,...}`.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: TasksCommand) -> Result<()> {
    match cmd {
        TasksCommand::List { bigbench, json } => list(&bigbench, json),
        TasksCommand::Split { task, seed, json } => {
            let t = task.load()?;
            let split = Split::new(seed, t.examples.len());
            if json {
                println!("{}", json!({ "train": split.train, "test": split.test }));
            } else {
                println!("{}: {} examples, seed {seed}", t.name, t.examples.len());
                println!("train ({}): {}", split.train.len(), preview(&split.train));
                println!("test ({}): {}", split.test.len(), preview(&split.test));
            }
            Ok(())
        }
        TasksCommand::Prompt {
            task,
            index,
            variant,
            instruction,
            json,
        } => {
            let t = task.load()?;
            let example = t.example(index)?;
            let prompt = Prompt::build(&t, example, &instruction, variant.into()).text();
            let target = example.answer.gold();
            if json {
                println!("{}", json!({ "prompt": prompt, "target": target }));
            } else {
                println!("{prompt}\n---\ntarget: {target}");
            }
            Ok(())
        }
    }
}

fn list(bigbench: &BigBench, json: bool) -> Result<()> {
    let catalog = Catalog::discover(&bigbench.dir)?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for entry in catalog.entries() {
        match hir_core::task::Task::load(&entry.file, &entry.path) {
            Ok(task) => rows.push(task),
            Err(err) => failures.push(err),
        }
    }
    if json {
        let tasks: Vec<_> = rows
            .iter()
            .map(|t| json!({ "name": t.name, "path": t.path, "examples": t.examples.len(), "kind": t.kind.as_str() }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&tasks)?);
    } else {
        let width = rows.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
        println!("{:<width$}  {:>8}  kind", "task", "examples");
        for t in &rows {
            println!("{:<width$}  {:>8}  {}", t.name, t.examples.len(), t.kind);
        }
        println!("{} tasks under {}", rows.len(), catalog.root().display());
    }
    for err in &failures {
        eprintln!("error: {err}");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {} task files could not be loaded (see above)",
            failures.len(),
            catalog.entries().len()
        )
    }
}

pub fn score(args: ScoreArgs) -> Result<()> {
    let task = args.task.load()?;
    let example = task.example(args.index)?;
    let s = score_output(&example.answer, &args.output);
    let gold = example.answer.gold();
    if args.json {
        println!(
            "{}",
            json!({ "exact": s.exact, "extracted": s.extracted, "predicted": s.predicted, "gold": gold })
        );
    } else {
        println!("gold:      {gold}");
        println!(
            "predicted: {}",
            s.predicted.as_deref().unwrap_or(hir_core::eval::NO_ANSWER)
        );
        println!("exact:     {}", s.exact);
        println!("extracted: {}", s.extracted);
    }
    Ok(())
}

fn preview(indices: &[usize]) -> String {
    let head: Vec<String> = indices.iter().take(10).map(usize::to_string).collect();
    let more = if indices.len() > 10 { ", …" } else { "" };
    format!("[{}{more}]", head.join(", "))
}
