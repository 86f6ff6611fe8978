//! BIG-bench JSON tasks and a catalog over a `benchmark_tasks/`-style folder.
//!
//! A task file holds `examples`, each with an `input` and either `target_scores` (multiple
//! choice: option text → score, in file order) or `target` (generative: one string or a
//! list of acceptable strings), plus optional `task_prefix` and `example_input_prefix`.
//! Tasks are named as in the reference scripts (`tracking_shuffled_objects_three_objects`)
//! and found by that name or by their path (`tracking_shuffled_objects/three_objects`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::{CoreError, Result};

/// The file name of a JSON task in BIG-bench.
pub const TASK_FILE: &str = "task.json";

crate::text_enum! {
    /// Whether a task asks to pick an option or to write the answer.
    pub enum TaskKind {
        /// Every example has `target_scores`; options are lettered (A), (B), ...
        MultipleChoice => "multiple_choice",
        /// Every example has `target`; the gold answer is a string such as `3`.
        Generative => "generative",
    }
}

/// The answer side of one example.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Options in file order with their scores; at least one scores 1.
    MultipleChoice {
        /// `(option text, score)` in the order of `target_scores`.
        options: Vec<(String, f64)>,
        /// Index of the first option scoring 1: the reference's gold answer.
        gold: usize,
    },
    /// Acceptable answers; never empty.
    Generative {
        /// Every string in `target`.
        targets: Vec<String>,
        /// Index of the target the reference compares against (`target[1]` for a list of
        /// two or more, as the reference does for object_counting's `["three", "3"]`).
        gold: usize,
    },
}

impl Answer {
    /// The kind of task this answer belongs to.
    pub fn kind(&self) -> TaskKind {
        match self {
            Answer::MultipleChoice { .. } => TaskKind::MultipleChoice,
            Answer::Generative { .. } => TaskKind::Generative,
        }
    }

    /// The gold answer string the reference scores against: `"(C)"` or the gold target.
    pub fn gold(&self) -> String {
        match self {
            Answer::MultipleChoice { gold, .. } => option_label(*gold),
            Answer::Generative { targets, gold } => targets[*gold].clone(),
        }
    }
}

/// The label of option `i` as the reference writes it: `(A)`, `(B)`, … (`chr(65 + i)`).
pub fn option_label(i: usize) -> String {
    format!("({})", option_letter(i))
}

/// The letter of option `i`: `chr(65 + i)`, as the reference computes it (past `Z` it goes on
/// through the ASCII table, exactly like Python's `chr`).
pub fn option_letter(i: usize) -> char {
    u32::try_from(65 + i)
        .ok()
        .and_then(char::from_u32)
        .unwrap_or('?')
}

/// One example of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The example's `input`.
    pub input: String,
    /// Its answer.
    pub answer: Answer,
}

/// A loaded, validated task.
#[derive(Debug, Clone)]
pub struct Task {
    /// Name as in the reference scripts: the path with `/` replaced by `_`.
    pub name: String,
    /// Path relative to the catalog root, with `/` separators.
    pub path: String,
    /// The `task.json` it was read from.
    pub file: PathBuf,
    /// `task_prefix` (or "").
    pub task_prefix: String,
    /// `example_input_prefix` (or "").
    pub example_input_prefix: String,
    /// Whether the task is multiple choice or generative.
    pub kind: TaskKind,
    /// The examples in file order; never empty.
    pub examples: Vec<Example>,
}

impl Task {
    /// Reads and validates a task file. `path` is the task's path relative to its catalog
    /// root (it becomes the task's name with `/` replaced by `_`).
    pub fn load(file: &Path, path: &str) -> Result<Self> {
        let bytes = std::fs::read(file).map_err(|source| CoreError::Io {
            path: file.to_path_buf(),
            source,
        })?;
        Self::from_json(&bytes, file, path)
    }

    /// Parses and validates task JSON. `file` is only used in error messages.
    pub fn from_json(bytes: &[u8], file: &Path, path: &str) -> Result<Self> {
        let raw: RawTask = serde_json::from_slice(bytes).map_err(|e| CoreError::NotATask {
            path: file.to_path_buf(),
            reason: e.to_string(),
        })?;
        let name = task_name(path);
        let Some(raw_examples) = raw.examples else {
            return Err(CoreError::NotATask {
                path: file.to_path_buf(),
                reason:
                    "it has no `examples` array (programmatic and parent tasks are not JSON tasks)"
                        .into(),
            });
        };
        if raw_examples.is_empty() {
            return Err(CoreError::NotATask {
                path: file.to_path_buf(),
                reason: "`examples` is empty".into(),
            });
        }
        let bad = |index: usize, field: &'static str, reason: String| CoreError::BadExample {
            path: file.to_path_buf(),
            task: name.clone(),
            index,
            field,
            reason,
        };
        let mut examples = Vec::with_capacity(raw_examples.len());
        for (index, ex) in raw_examples.into_iter().enumerate() {
            let input = ex
                .input
                .ok_or_else(|| bad(index, "input", "missing".into()))?;
            let answer = match (ex.target_scores, ex.target) {
                (Some(OrderedScores(options)), _) => {
                    if options.is_empty() {
                        return Err(bad(index, "target_scores", "has no options".into()));
                    }
                    // The reference's `list(target_scores.values()).index(1)`.
                    let gold = options.iter().position(|(_, s)| *s == 1.0).ok_or_else(|| {
                        bad(
                            index,
                            "target_scores",
                            "no option has score 1, so the example has no correct answer".into(),
                        )
                    })?;
                    Answer::MultipleChoice { options, gold }
                }
                (None, Some(RawTarget::One(t))) => Answer::Generative {
                    targets: vec![t],
                    gold: 0,
                },
                (None, Some(RawTarget::Many(targets))) => {
                    if targets.is_empty() {
                        return Err(bad(index, "target", "is an empty list".into()));
                    }
                    // The reference uses target[1] for a list (object_counting: ["three", "3"]).
                    let gold = usize::from(targets.len() >= 2);
                    Answer::Generative { targets, gold }
                }
                (None, None) => {
                    return Err(bad(
                        index,
                        "target_scores",
                        "neither `target_scores` nor `target` is present".into(),
                    ))
                }
            };
            examples.push(Example { input, answer });
        }
        let kind = examples[0].answer.kind();
        if let Some(index) = examples.iter().position(|e| e.answer.kind() != kind) {
            return Err(bad(
                index,
                "target_scores",
                format!("the task mixes kinds: example 0 is {kind}, this one is not; one kind per task is supported"),
            ));
        }
        Ok(Self {
            name,
            path: path.to_string(),
            file: file.to_path_buf(),
            task_prefix: raw.task_prefix.unwrap_or_default(),
            example_input_prefix: raw.example_input_prefix.unwrap_or_default(),
            kind,
            examples,
        })
    }

    /// The example at `index`, or an error naming the task and the valid range.
    pub fn example(&self, index: usize) -> Result<&Example> {
        self.examples.get(index).ok_or(CoreError::IndexOutOfRange {
            task: self.name.clone(),
            index,
            len: self.examples.len(),
        })
    }
}

/// The reference's name for a task path: `logical_deduction/three_objects` →
/// `logical_deduction_three_objects`.
pub fn task_name(path: &str) -> String {
    path.trim_matches('/').replace('/', "_")
}

// === Raw JSON shape ===

#[derive(Deserialize)]
struct RawTask {
    #[serde(default)]
    task_prefix: Option<String>,
    #[serde(default)]
    example_input_prefix: Option<String>,
    #[serde(default)]
    examples: Option<Vec<RawExample>>,
}

#[derive(Deserialize)]
struct RawExample {
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    target_scores: Option<OrderedScores>,
    #[serde(default)]
    target: Option<RawTarget>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTarget {
    One(String),
    Many(Vec<String>),
}

/// `target_scores` keeps its keys in file order: the option letters depend on it.
struct OrderedScores(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for OrderedScores {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct ScoresVisitor;
        impl<'de> Visitor<'de> for ScoresVisitor {
            type Value = OrderedScores;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object mapping option text to a numeric score")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut options = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((key, score)) = map.next_entry::<String, f64>()? {
                    if options.iter().any(|(k, _): &(String, f64)| *k == key) {
                        return Err(de::Error::custom(format!(
                            "duplicate option `{key}` in target_scores"
                        )));
                    }
                    options.push((key, score));
                }
                Ok(OrderedScores(options))
            }
        }
        deserializer.deserialize_map(ScoresVisitor)
    }
}

// === Catalog ===

/// One task file found under a catalog root; parsed on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEntry {
    /// The reference's task name.
    pub name: String,
    /// Path relative to the root, `/`-separated.
    pub path: String,
    /// The `task.json`.
    pub file: PathBuf,
}

/// The JSON tasks under a BIG-bench `benchmark_tasks/` folder (or a folder laid out like it).
#[derive(Debug, Clone)]
pub struct Catalog {
    root: PathBuf,
    entries: Vec<TaskEntry>,
}

impl Catalog {
    /// Finds every `task.json` under `root`. A BIG-bench checkout's top folder works too (its
    /// `bigbench/benchmark_tasks` is used). Parent tasks whose subtasks have their own
    /// `task.json` are left out, as BIG-bench itself does.
    pub fn discover(root: &Path) -> Result<Self> {
        let nested = root.join("bigbench").join("benchmark_tasks");
        let root = if nested.is_dir() {
            nested
        } else {
            root.to_path_buf()
        };
        let meta = std::fs::metadata(&root).map_err(|source| CoreError::Io {
            path: root.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(CoreError::NoTasks(root));
        }
        let mut entries = Vec::new();
        walk(&root, &root, &mut entries)?;
        if entries.is_empty() {
            return Err(CoreError::NoTasks(root));
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { root, entries })
    }

    /// The folder the catalog was read from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every task found, sorted by name.
    pub fn entries(&self) -> &[TaskEntry] {
        &self.entries
    }

    /// The entry for a task name (`logical_deduction_three_objects`) or path
    /// (`logical_deduction/three_objects`).
    pub fn find(&self, name_or_path: &str) -> Result<&TaskEntry> {
        let wanted = name_or_path.trim().trim_matches('/');
        let as_name = task_name(wanted);
        if let Some(entry) = self
            .entries
            .iter()
            .find(|e| e.path == wanted || e.name == as_name)
        {
            return Ok(entry);
        }
        let close: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| e.name.contains(&as_name) || as_name.contains(e.name.as_str()))
            .map(|e| e.name.as_str())
            .take(5)
            .collect();
        let hint = if close.is_empty() {
            format!(
                "{} tasks are available; `hir tasks list` shows them",
                self.entries.len()
            )
        } else {
            format!("did you mean {}?", close.join(", "))
        };
        Err(CoreError::UnknownTask {
            name: crate::text_enum::bounded(name_or_path),
            root: self.root.clone(),
            hint,
        })
    }

    /// Finds and loads one task.
    pub fn load(&self, name_or_path: &str) -> Result<Task> {
        let entry = self.find(name_or_path)?;
        Task::load(&entry.file, &entry.path)
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<TaskEntry>) -> Result<bool> {
    let read = std::fs::read_dir(dir).map_err(|source| CoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut subdirs = Vec::new();
    let mut has_task_file = false;
    for item in read {
        let item = item.map_err(|source| CoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let file_type = item.file_type().map_err(|source| CoreError::Io {
            path: item.path(),
            source,
        })?;
        if file_type.is_dir() {
            subdirs.push(item.path());
        } else if item.file_name() == TASK_FILE {
            has_task_file = true;
        }
    }
    let mut has_child_task = false;
    for sub in subdirs {
        has_child_task |= walk(root, &sub, out)?;
    }
    if has_task_file && !has_child_task && dir != root {
        let rel = dir.strip_prefix(root).unwrap_or(dir);
        let path = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        out.push(TaskEntry {
            name: task_name(&path),
            path,
            file: dir.join(TASK_FILE),
        });
    }
    Ok(has_task_file || has_child_task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Task> {
        Task::from_json(json.as_bytes(), Path::new("x/task.json"), "x/y")
    }

    #[test]
    fn multiple_choice_keeps_option_order_and_finds_the_first_correct_option() {
        let task =
            parse(r#"{"examples":[{"input":"q","target_scores":{"z":0,"a":1.0,"m":1}}]}"#).unwrap();
        assert_eq!(task.name, "x_y");
        assert_eq!(task.kind, TaskKind::MultipleChoice);
        let Answer::MultipleChoice { options, gold } = &task.examples[0].answer else {
            panic!()
        };
        assert_eq!(
            options.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
            ["z", "a", "m"]
        );
        assert_eq!(*gold, 1);
        assert_eq!(task.examples[0].answer.gold(), "(B)");
    }

    #[test]
    fn generative_list_targets_use_the_second_entry_like_the_reference() {
        let task = parse(
            r#"{"examples":[{"input":"q","target":["three","3"]},{"input":"r","target":"x y"}]}"#,
        )
        .unwrap();
        assert_eq!(task.kind, TaskKind::Generative);
        assert_eq!(task.examples[0].answer.gold(), "3");
        assert_eq!(task.examples[1].answer.gold(), "x y");
        let one = parse(r#"{"examples":[{"input":"q","target":["only"]}]}"#).unwrap();
        assert_eq!(one.examples[0].answer.gold(), "only");
    }

    #[test]
    fn an_example_without_a_correct_option_is_named_in_the_error() {
        let err = parse(r#"{"examples":[{"input":"q","target_scores":{"a":1}},{"input":"q","target_scores":{"a":0,"b":0.5}}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x/task.json"), "{err}");
        assert!(
            err.contains("task `x_y`, example 1, field `target_scores`"),
            "{err}"
        );
        assert!(err.contains("no option has score 1"), "{err}");
    }

    #[test]
    fn malformed_files_are_rejected_with_the_reason() {
        for (json, needle) in [
            ("not json", "expected"),
            (r#"{"name":"t"}"#, "no `examples`"),
            (r#"{"examples":[]}"#, "`examples` is empty"),
            (r#"{"examples":[{"target":"a"}]}"#, "field `input`: missing"),
            (
                r#"{"examples":[{"input":"q"}]}"#,
                "neither `target_scores` nor `target`",
            ),
            (r#"{"examples":[{"input":"q","target":[]}]}"#, "empty list"),
            (
                r#"{"examples":[{"input":"q","target_scores":{}}]}"#,
                "has no options",
            ),
            (
                r#"{"examples":[{"input":"q","target_scores":{"a":1,"a":0}}]}"#,
                "duplicate option",
            ),
            (
                r#"{"examples":[{"input":"q","target_scores":{"a":"yes"}}]}"#,
                "invalid type",
            ),
            (
                r#"{"examples":[{"input":"q","target":"a"},{"input":"q","target_scores":{"a":1}}]}"#,
                "mixes kinds",
            ),
        ] {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn option_letters_follow_python_chr() {
        assert_eq!(option_label(0), "(A)");
        assert_eq!(option_label(25), "(Z)");
        assert_eq!(option_letter(26), '[');
    }
}
