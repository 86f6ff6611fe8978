//! FLAN-T5 (T5 v1.1) encoder-decoder.
//!
//! T5's RMS layer norm without bias, relative position buckets (shared by all
//! layers of a stack, bidirectional in the encoder, causal in the decoder),
//! unscaled dot-product attention, gated-GELU feed-forward (`gelu_new`, the
//! tanh approximation), and an untied `lm_head`; when embeddings are tied the
//! decoder output is scaled by `d_model^-0.5` as in Hugging Face. See
//! <https://huggingface.co/docs/transformers/model_doc/flan-t5>.
//!
//! Batches carry padding masks for encoder and decoder. All ops are
//! differentiable. For sampling, [`Model::prefill`] encodes the prompts once and
//! keeps each decoder layer's cross-attention keys and values in a [`T5Cache`],
//! together with the decoder's self-attention KV cache, so that
//! [`Model::decode_step`] runs one token per sequence.
//!
//! One job per file: `config` (the Hugging Face `config.json`), `layers` (attention,
//! feed-forward, relative position buckets, dropout), `model` (the network and its
//! teacher-forced forward passes), `cache` ([`T5Cache`] and the prefill and decode steps
//! of sampling), `load` (a model from a folder) and `save` (a model to a checkpoint).

mod cache;
mod config;
mod layers;
pub(crate) mod load;
mod model;
mod save;

pub use cache::T5Cache;
pub use config::Config;
pub use layers::{relative_position_bucket, Dropout};
pub use load::{load_folder, LoadedT5};
pub use model::Model;
