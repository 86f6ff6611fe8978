//! The core against the twelve real BIG-bench tasks of the paper (in `data/bigbench`).

use std::path::PathBuf;

use hir_core::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use hir_core::score::score;
use hir_core::split::Split;
use hir_core::task::{Answer, Catalog, TaskKind};

fn catalog() -> Catalog {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench");
    Catalog::discover(&root).expect("data/bigbench holds the paper's tasks")
}

const PAPER_TASKS: [(&str, usize, TaskKind); 12] = [
    ("date_understanding", 369, TaskKind::MultipleChoice),
    ("geometric_shapes", 360, TaskKind::MultipleChoice),
    (
        "logical_deduction_five_objects",
        500,
        TaskKind::MultipleChoice,
    ),
    (
        "logical_deduction_seven_objects",
        700,
        TaskKind::MultipleChoice,
    ),
    (
        "logical_deduction_three_objects",
        300,
        TaskKind::MultipleChoice,
    ),
    ("object_counting", 1000, TaskKind::Generative),
    ("penguins_in_a_table", 149, TaskKind::MultipleChoice),
    (
        "reasoning_about_colored_objects",
        2000,
        TaskKind::MultipleChoice,
    ),
    (
        "tracking_shuffled_objects_five_objects",
        1250,
        TaskKind::MultipleChoice,
    ),
    (
        "tracking_shuffled_objects_seven_objects",
        1750,
        TaskKind::MultipleChoice,
    ),
    (
        "tracking_shuffled_objects_three_objects",
        750,
        TaskKind::MultipleChoice,
    ),
    ("word_sorting", 1900, TaskKind::Generative),
];

#[test]
fn the_twelve_tasks_load_with_their_sizes_and_kinds() {
    let catalog = catalog();
    let names: Vec<&str> = catalog.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, PAPER_TASKS.iter().map(|t| t.0).collect::<Vec<_>>());
    for (name, n, kind) in PAPER_TASKS {
        let task = catalog.load(name).unwrap();
        assert_eq!((task.examples.len(), task.kind), (n, kind), "{name}");
    }
}

#[test]
fn tasks_are_found_by_name_and_by_path() {
    let catalog = catalog();
    let by_path = catalog
        .find("tracking_shuffled_objects/three_objects")
        .unwrap();
    let by_name = catalog
        .find("tracking_shuffled_objects_three_objects")
        .unwrap();
    assert_eq!(by_path, by_name);
    let err = catalog
        .find("tracking_shuffled_objects")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("did you mean tracking_shuffled_objects_five_objects"),
        "{err}"
    );
}

#[test]
fn splits_match_numpy_for_all_twelve_tasks() {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("data/hir_splits_seed1.json"))
            .expect("test vectors parse");
    let catalog = catalog();
    for (name, n, _) in PAPER_TASKS {
        let task = catalog.load(name).unwrap();
        let v = &vectors[task.path.as_str()];
        assert_eq!(v["n"].as_u64(), Some(n as u64), "{name}");
        let expected: Vec<usize> = v["permutation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let split = Split::new(1, task.examples.len());
        assert_eq!(
            split.train.len() as u64,
            v["train_size"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            split.test.len() as u64,
            v["test_size"].as_u64().unwrap(),
            "{name}"
        );
        let ours: Vec<usize> = split.train.iter().chain(&split.test).copied().collect();
        assert_eq!(ours, expected, "{name}");
    }
}

#[test]
fn prompt_of_tso3_example_0_is_the_reference_text() {
    let task = catalog()
        .load("tracking_shuffled_objects_three_objects")
        .unwrap();
    let ex = &task.examples[0];
    let text = Prompt::build(&task, ex, DEFAULT_INSTRUCTION, PromptVariant::Sampler).text();
    assert!(text.starts_with(
        "Solve the question with correct answer.\n\nQ: Alice, Bob, and Claire are playing a game."
    ));
    assert!(text.ends_with("At the end of the game, Alice has the \nOptions:\n(A) orange ball.\n(B) white ball.\n(C) blue ball.\nA:"));
    assert_eq!(ex.answer.gold(), "(C)");
    assert!(score(&ex.answer, "(C)").exact);
}

#[test]
fn multi_answer_items_are_counted_as_documented() {
    let catalog = catalog();
    let multi = |name: &str| {
        let task = catalog.load(name).unwrap();
        task.examples
            .iter()
            .filter(|e| matches!(&e.answer, Answer::MultipleChoice { options, .. } if options.iter().filter(|o| o.1 == 1.0).count() >= 2))
            .count()
    };
    assert_eq!(multi("geometric_shapes"), 72);
    assert_eq!(multi("reasoning_about_colored_objects"), 816);
}

#[test]
fn object_counting_gold_is_the_digit() {
    let task = catalog().load("object_counting").unwrap();
    let gold = task.examples[0].answer.gold();
    assert!(gold.chars().all(|c| c.is_ascii_digit()), "{gold}");
}
