//! Training batches: [`Example`]s (a prompt without loss and a completion with it)
//! right-padded into a [`TrainBatch`], laid out for a decoder-only model or for T5's
//! encoder and decoder.

use candle_core::Tensor;

use crate::arch::t5;
use crate::arch::AnyModel;
use crate::error::{ModelError, Result};
use crate::kernels::ops::IGNORE_INDEX;

/// One training example: the prompt carries no loss, the completion does. A decoder-only
/// model reads them as one sequence; T5 encodes the prompt and decodes the completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Prompt tokens (instruction, query, output prefix).
    pub prompt: Vec<u32>,
    /// Completion tokens (the labels).
    pub completion: Vec<u32>,
}

/// A right-padded training batch.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// Token ids `[B, T]` (for T5, the encoder's).
    pub input_ids: Tensor,
    /// Padding mask, `[B][T]`.
    pub mask: Vec<Vec<u8>>,
    /// Labels `[B, T]` (`[B, T_dec]` for T5): the token at each completion position,
    /// else -100.
    pub labels: Tensor,
    /// Number of labelled tokens.
    pub n_labels: usize,
    /// For T5: decoder inputs (the labels shifted right) and their mask.
    pub decoder: Option<(Tensor, Vec<Vec<u8>>)>,
}

impl TrainBatch {
    /// The batch layout `model` trains on: [`TrainBatch::new`] for a decoder-only model,
    /// [`TrainBatch::seq2seq`] for T5.
    pub fn for_model(
        model: &AnyModel,
        examples: &[Example],
        pad_id: u32,
        device: &candle_core::Device,
    ) -> Result<Self> {
        match model {
            AnyModel::Llama(_) => Self::new(examples, pad_id, device),
            AnyModel::T5(m) => Self::seq2seq(m, examples, pad_id, device),
        }
    }

    /// An encoder-decoder batch: prompts right-padded as the encoder input, completions as
    /// labels (right-padded with -100), decoder inputs shifted right behind the start token.
    pub fn seq2seq(
        model: &t5::Model,
        examples: &[Example],
        pad_id: u32,
        device: &candle_core::Device,
    ) -> Result<Self> {
        if examples.is_empty()
            || examples
                .iter()
                .any(|e| e.completion.is_empty() || e.prompt.is_empty())
        {
            return Err(ModelError::InvalidRequest(
                "a batch needs examples with non-empty prompts and completions".into(),
            ));
        }
        let ts = examples.iter().map(|e| e.prompt.len()).max().unwrap_or(0);
        let tt = examples
            .iter()
            .map(|e| e.completion.len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * ts);
        let mut mask = Vec::with_capacity(examples.len());
        let mut labels = Vec::with_capacity(examples.len());
        for e in examples {
            ids.extend_from_slice(&e.prompt);
            ids.extend(std::iter::repeat_n(pad_id, ts - e.prompt.len()));
            let mut m = vec![1u8; e.prompt.len()];
            m.resize(ts, 0);
            mask.push(m);
            let mut l: Vec<i64> = e.completion.iter().map(|&x| i64::from(x)).collect();
            l.resize(tt, IGNORE_INDEX);
            labels.push(l);
        }
        let decoder = model.shift_right(&labels)?;
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (examples.len(), ts), device)?,
            mask,
            labels: Tensor::new(labels, device)?,
            n_labels: examples.iter().map(|e| e.completion.len()).sum(),
            decoder: Some(decoder),
        })
    }

    /// Builds a right-padded decoder-only batch (`pad_id` fills padding).
    pub fn new(examples: &[Example], pad_id: u32, device: &candle_core::Device) -> Result<Self> {
        if examples.is_empty() || examples.iter().any(|e| e.completion.is_empty()) {
            return Err(ModelError::InvalidRequest(
                "a batch needs examples with non-empty completions".into(),
            ));
        }
        let t = examples
            .iter()
            .map(|e| e.prompt.len() + e.completion.len())
            .max()
            .unwrap_or(0);
        let b = examples.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut labels = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b);
        let mut n_labels = 0;
        for e in examples {
            let len = e.prompt.len() + e.completion.len();
            ids.extend(e.prompt.iter().chain(e.completion.iter()).copied());
            ids.extend(std::iter::repeat_n(pad_id, t - len));
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, e.prompt.len()));
            labels.extend(e.completion.iter().map(|&x| i64::from(x)));
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, t - len));
            let mut m = vec![1u8; len];
            m.extend(std::iter::repeat_n(0u8, t - len));
            mask.push(m);
            n_labels += e.completion.len();
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            mask,
            labels: Tensor::from_vec(labels, (b, t), device)?,
            n_labels,
            decoder: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn train_batch_labels_only_the_completion() {
        let ex = [
            Example {
                prompt: vec![5, 6],
                completion: vec![7],
            },
            Example {
                prompt: vec![1],
                completion: vec![2, 3, 4],
            },
        ];
        let b = TrainBatch::new(&ex, 0, &Device::Cpu).unwrap();
        assert_eq!(
            b.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 0], vec![1, 2, 3, 4]]
        );
        assert_eq!(
            b.labels.to_vec2::<i64>().unwrap(),
            vec![vec![-100, -100, 7, -100], vec![-100, 2, 3, 4]]
        );
        assert_eq!(b.mask, vec![vec![1, 1, 1, 0], vec![1, 1, 1, 1]]);
        assert_eq!(b.n_labels, 4);
    }
}
