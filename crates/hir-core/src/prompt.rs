//! Prompts, built exactly as the reference's sampler and evaluator build them (HIR.md §3.2).
//!
//! A prompt is an instruction line followed by a body: `"<instruction>" + "\n\nQ: <entry>\nA:"`
//! for sampling and `"<instruction>" + "\n\n\nQ: <entry>\nA:"` for evaluation (the reference's
//! evaluator adds one newline). Keeping the two parts apart lets a relabel policy swap the
//! instruction without searching the text for the first blank line as the reference does.

use crate::task::{option_label, Answer, Example, Task};

/// The instruction the reference samples and evaluates under (`CoT.txt`, without its newline).
pub const DEFAULT_INSTRUCTION: &str = "Solve the question with correct answer.";

/// Which of the reference's two prompt layouts to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptVariant {
    /// The online sampler's prompt: `instruction\n\nQ: …\nA:`.
    Sampler,
    /// The evaluator's prompt, one newline longer: `instruction\n\n\nQ: …\nA:`.
    Eval,
}

/// An instruction and the query body that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The instruction line, without a trailing newline.
    pub instruction: String,
    /// Everything after the instruction, starting with its newlines.
    pub body: String,
}

impl Prompt {
    /// The prompt of `example` in `task` under `instruction`.
    pub fn build(
        task: &Task,
        example: &Example,
        instruction: &str,
        variant: PromptVariant,
    ) -> Self {
        let separator = match variant {
            PromptVariant::Sampler => "\n\nQ: ",
            PromptVariant::Eval => "\n\n\nQ: ",
        };
        let body = format!("{separator}{}\nA:", entry(task, example));
        Self {
            instruction: instruction.to_string(),
            body,
        }
    }

    /// The full prompt text.
    pub fn text(&self) -> String {
        format!("{}{}", self.instruction, self.body)
    }

    /// The same query under another instruction: the reference's
    /// `(label + text[text.index("\n\n"):]).lstrip(" ")`.
    pub fn with_instruction(&self, instruction: &str) -> Self {
        Self {
            instruction: instruction.trim_start_matches(' ').to_string(),
            body: self.body.clone(),
        }
    }
}

/// The reference's `entry`: prefix, input and (for multiple choice) the lettered options.
pub fn entry(task: &Task, example: &Example) -> String {
    let prefix = format!("{}{}", task.task_prefix, task.example_input_prefix).replace("\n\n", "\n");
    match &example.answer {
        Answer::MultipleChoice { options, .. } => {
            let mut entry = prefix;
            entry.push_str(&example.input.replace("\n\n", ""));
            entry.push_str("\nOptions:");
            for (i, (text, _)) in options.iter().enumerate() {
                entry.push('\n');
                entry.push_str(&option_label(i));
                entry.push(' ');
                entry.push_str(text);
            }
            entry
        }
        Answer::Generative { .. } => prefix + &example.input.replace("\n\n", "\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn task(json: &str) -> Task {
        Task::from_json(json.as_bytes(), Path::new("t/task.json"), "t").unwrap()
    }

    #[test]
    fn multiple_choice_prompt_matches_the_reference_layout() {
        let t = task(
            r#"{"task_prefix":"Pre\n\nfix\n","example_input_prefix":"","examples":[
                {"input":"Who?\n\nTell.","target_scores":{"x.":0,"y.":1}}]}"#,
        );
        let p = Prompt::build(
            &t,
            &t.examples[0],
            DEFAULT_INSTRUCTION,
            PromptVariant::Sampler,
        );
        assert_eq!(
            p.text(),
            "Solve the question with correct answer.\n\nQ: Pre\nfix\nWho?Tell.\nOptions:\n(A) x.\n(B) y.\nA:"
        );
        let e = Prompt::build(&t, &t.examples[0], DEFAULT_INSTRUCTION, PromptVariant::Eval);
        assert_eq!(e.text(), p.text().replacen("\n\nQ:", "\n\n\nQ:", 1));
    }

    #[test]
    fn generative_prompt_keeps_single_newlines() {
        let t = task(
            r#"{"task_prefix":"Sort:","example_input_prefix":"\nList: ","examples":[{"input":"b\n\na","target":"a b"}]}"#,
        );
        let p = Prompt::build(
            &t,
            &t.examples[0],
            DEFAULT_INSTRUCTION,
            PromptVariant::Sampler,
        );
        assert_eq!(
            p.text(),
            "Solve the question with correct answer.\n\nQ: Sort:\nList: b\na\nA:"
        );
    }

    #[test]
    fn relabeling_swaps_only_the_instruction() {
        let t = task(r#"{"examples":[{"input":"q","target":"a"}]}"#);
        let p = Prompt::build(
            &t,
            &t.examples[0],
            DEFAULT_INSTRUCTION,
            PromptVariant::Sampler,
        );
        let r = p.with_instruction(" Solve the question with wrong answer.");
        assert_eq!(
            r.text(),
            "Solve the question with wrong answer.\n\nQ: q\nA:"
        );
    }
}
