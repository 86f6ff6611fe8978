//! The service before the model is loaded: the server answers (health says NOT_SERVING)
//! while the model loads, and every RPC says UNAVAILABLE until it is in.

use std::sync::Arc;

use hir_proto::pb;
use hir_proto::pb::generator_service_server::GeneratorService;
use tonic::{Request, Response, Status, Streaming};

use super::{CompletionStream, Generator};
use crate::engine::EngineHandle;

/// The service before and after the model is loaded: every RPC answers UNAVAILABLE until
/// [`GeneratorSlot::set`] installs the loaded generator. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct GeneratorSlot(Arc<std::sync::OnceLock<Generator>>);

impl GeneratorSlot {
    /// Installs the loaded generator (once; later calls are ignored).
    pub fn set(&self, generator: Generator) {
        let _ = self.0.set(generator);
    }

    /// Whether the model is loaded.
    pub fn is_ready(&self) -> bool {
        self.0.get().is_some()
    }

    /// The engine, once loaded.
    pub fn engine(&self) -> Option<EngineHandle> {
        self.0.get().map(|g| g.engine.clone())
    }

    fn get(&self) -> Result<&Generator, Status> {
        self.0.get().ok_or_else(|| {
            Status::unavailable("the model is still loading; retry when health reports SERVING")
        })
    }
}

#[tonic::async_trait]
impl GeneratorService for GeneratorSlot {
    type GenerateStream = CompletionStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.get()?.generate(request).await
    }

    async fn log_probs(
        &self,
        request: Request<pb::LogProbsRequest>,
    ) -> Result<Response<pb::LogProbsResponse>, Status> {
        self.get()?.log_probs(request).await
    }

    async fn swap_weights(
        &self,
        request: Request<pb::SwapWeightsRequest>,
    ) -> Result<Response<pb::SwapWeightsResponse>, Status> {
        self.get()?.swap_weights(request).await
    }

    async fn upload_weights(
        &self,
        request: Request<Streaming<pb::UploadWeightsRequest>>,
    ) -> Result<Response<pb::SwapWeightsResponse>, Status> {
        self.get()?.upload_weights(request).await
    }

    async fn get_model_info(
        &self,
        request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        self.get()?.get_model_info(request).await
    }
}
