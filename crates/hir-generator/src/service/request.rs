//! `Generate` and `LogProbs` requests validated into the engine's work: every bound
//! checked before the prompts are tokenized, and the tokenized prompts checked again.

use std::sync::atomic::Ordering;
use std::time::Instant;

use hir_model::SamplingParams;
use hir_proto::pb;

use super::Generator;
use crate::config::{RequestLimits, BYTES_PER_TOKEN};
use crate::engine::{Completion, Job, Serving};
use crate::error::{GeneratorError, Result};

impl Generator {
    /// Turns a request into a job, or says which field is wrong. Everything that can be
    /// checked without the tokenizer is checked first; the prompts are then tokenized on a
    /// blocking thread, so that large ones never hold up the server's other calls.
    pub(super) async fn job(
        &self,
        req: pb::GenerateRequest,
        out: tokio::sync::mpsc::UnboundedSender<Result<Completion>>,
    ) -> Result<Job> {
        let serving = self.engine.serving();
        let limits = self.request_limits(&serving);
        if req.prompts.is_empty() {
            return Err(GeneratorError::invalid(
                "prompts",
                "at least one prompt is required",
            ));
        }
        if req.prompts.len() > limits.max_prompts_per_request {
            return Err(GeneratorError::invalid(
                "prompts",
                format!(
                    "{} prompts; at most {} per request",
                    req.prompts.len(),
                    limits.max_prompts_per_request
                ),
            ));
        }
        let n = req.n as usize;
        if n == 0 || n > limits.max_n {
            return Err(GeneratorError::invalid(
                "n",
                format!("is {n}; must be between 1 and {}", limits.max_n),
            ));
        }
        let sequences = req.prompts.len() * n;
        if sequences > limits.max_sequences_per_request {
            return Err(GeneratorError::invalid(
                "n",
                format!(
                    "the request has {sequences} sequences (prompts times n); at most {} per request",
                    limits.max_sequences_per_request
                ),
            ));
        }
        let s = req.sampling.unwrap_or_default();
        if !s.temperature.is_finite() || s.temperature < 0.0 {
            return Err(GeneratorError::invalid(
                "sampling.temperature",
                format!(
                    "is {}; must be finite and >= 0 (0 is greedy)",
                    s.temperature
                ),
            ));
        }
        let top_p = if s.top_p == 0.0 { 1.0 } else { s.top_p };
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(GeneratorError::invalid(
                "sampling.top_p",
                format!("is {}; must be in (0, 1]", s.top_p),
            ));
        }
        let max_new = s.max_new_tokens as usize;
        if max_new == 0 || max_new > limits.max_new_tokens {
            return Err(GeneratorError::invalid(
                "sampling.max_new_tokens",
                format!(
                    "is {max_new}; must be between 1 and {}",
                    limits.max_new_tokens
                ),
            ));
        }
        if s.stop.len() > limits.max_stop_strings {
            return Err(GeneratorError::invalid(
                "sampling.stop",
                format!("at most {} stop strings", limits.max_stop_strings),
            ));
        }
        if let Some(i) = s.stop.iter().position(|st| st.is_empty() || st.len() > 256) {
            return Err(GeneratorError::invalid(
                format!("sampling.stop[{i}]"),
                "must be 1 to 256 bytes",
            ));
        }
        for (i, text) in req.prompts.iter().enumerate() {
            if text.len() > limits.max_prompt_bytes {
                return Err(GeneratorError::invalid(
                    format!("prompts[{i}]"),
                    format!(
                        "is {} bytes; at most {} ({BYTES_PER_TOKEN} bytes per token of the longest prompt, {} tokens)",
                        text.len(),
                        limits.max_prompt_bytes,
                        limits.max_prompt_tokens
                    ),
                ));
            }
            if text.trim().is_empty() {
                return Err(GeneratorError::invalid(format!("prompts[{i}]"), "is empty"));
            }
        }
        let bytes: usize = req.prompts.iter().map(String::len).sum();
        if bytes > limits.max_request_bytes {
            return Err(GeneratorError::invalid(
                "prompts",
                format!(
                    "{bytes} bytes in all; at most {} per request ({BYTES_PER_TOKEN} bytes per token of the request's {} tokens)",
                    limits.max_request_bytes, limits.max_request_tokens
                ),
            ));
        }
        let (texts, chat) = (req.prompts, req.chat);
        let prompts =
            tokio::task::spawn_blocking(move || tokenize(&serving, &texts, chat, max_new, &limits))
                .await
                .map_err(|err| {
                    GeneratorError::Internal(format!("tokenizing the prompts: {err}"))
                })??;
        let seed = s.seed.unwrap_or_else(|| {
            self.seeds
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        });
        let params = SamplingParams {
            temperature: s.temperature,
            top_k: (s.top_k > 0).then_some(s.top_k as usize),
            top_p,
            seed,
            max_new_tokens: max_new,
            stop: s.stop,
            n,
        };
        let span = tracing::info_span!("generate", request_id = %req.request_id, prompts = prompts.len(), n, seed);
        Ok(Job {
            prompts,
            params,
            return_logprobs: req.return_logprobs,
            expected_version: Some(req.expected_version).filter(|v| !v.is_empty()),
            out,
            enqueued: Instant::now(),
            span,
        })
    }

    /// A `LogProbs` request's items as (prompt tokens, continuation tokens), or which item
    /// is wrong.
    pub(super) fn logprob_items(
        &self,
        requested: Vec<pb::LogProbsItem>,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let serving = self.engine.serving();
        let (vocab, context) = (
            serving.model.info().vocab_size,
            serving.model.info().context_length,
        );
        let max_items = self.request_limits(&serving).max_prompts_per_request;
        if requested.is_empty() || requested.len() > max_items {
            return Err(GeneratorError::invalid(
                "items",
                format!("need 1 to {max_items} items"),
            ));
        }
        let mut items = Vec::with_capacity(requested.len());
        for (i, item) in requested.into_iter().enumerate() {
            if item.prompt_token_ids.is_empty() || item.continuation_token_ids.is_empty() {
                return Err(GeneratorError::invalid(
                    format!("items[{i}]"),
                    "prompt and continuation must both be non-empty",
                ));
            }
            let needed = serving.model.model().context_needed(
                item.prompt_token_ids.len(),
                item.continuation_token_ids.len(),
            );
            if needed > context {
                return Err(GeneratorError::invalid(
                    format!("items[{i}]"),
                    format!("longer than the context of {context}"),
                ));
            }
            if let Some(bad) = item
                .prompt_token_ids
                .iter()
                .chain(&item.continuation_token_ids)
                .find(|&&t| t as usize >= vocab)
            {
                return Err(GeneratorError::invalid(
                    format!("items[{i}]"),
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            items.push((item.prompt_token_ids, item.continuation_token_ids));
        }
        Ok(items)
    }
}

/// Tokenizes each prompt (as a chat turn with `chat`) and checks it fits; blocking.
fn tokenize(
    serving: &Serving,
    texts: &[String],
    chat: bool,
    max_new: usize,
    limits: &RequestLimits,
) -> Result<Vec<Vec<u32>>> {
    let model = &serving.model;
    let context = model.info().context_length;
    let mut prompts = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let ids = if chat {
            model.encode_prompt(&model.chat_prompt(text))?
        } else {
            model.encode_prompt(text)?
        };
        if ids.is_empty() {
            return Err(GeneratorError::invalid(
                format!("prompts[{i}]"),
                "tokenizes to nothing",
            ));
        }
        if ids.len() > limits.max_prompt_tokens {
            return Err(GeneratorError::invalid(
                format!("prompts[{i}]"),
                format!(
                    "is {} tokens; at most {}",
                    ids.len(),
                    limits.max_prompt_tokens
                ),
            ));
        }
        if model.model().context_needed(ids.len(), max_new) > context {
            return Err(GeneratorError::invalid(
                format!("prompts[{i}]"),
                format!(
                    "{} tokens plus max_new_tokens {max_new} exceed the model's context of {context}",
                    ids.len()
                ),
            ));
        }
        prompts.push(ids);
    }
    Ok(prompts)
}
