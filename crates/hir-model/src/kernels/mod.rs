//! CPU kernels, the bottom of the crate: what they share ([`cpu`]: a tensor's values in
//! place, work split across candle's thread pool), dense matrix products ([`gemm`]), fused
//! training kernels with their backward passes ([`fused`]) and small operations
//! ([`ops`]). Nothing here knows a model.

pub mod cpu;
pub mod fused;
pub mod gemm;
pub mod ops;
