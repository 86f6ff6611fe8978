//! Scored and stored samples per second, with a generator stand-in that replays recorded
//! completions at once over a real gRPC socket, so the relabeler and Postgres are measured
//! alone. Baseline in the same run: the same pipeline writing one sample per transaction.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench -p hir-relabeler --bench relabeler`

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hir_core::run::RunConfig;
use hir_proto::pb;
use hir_proto::pb::generator_service_server::{GeneratorService, GeneratorServiceServer};
use hir_relabeler::metrics::Metrics;
use hir_relabeler::sampler::{Progress, Sampler, SamplerSettings};
use hir_runtime::generators::{Backoff, GeneratorPool};
use hir_store::{NewRun, Store};
use sqlx::{Connection, Executor, PgConnection};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Replays a few recorded answers instantly.
struct Replay;

const OUTPUTS: [&str; 6] = [
    "(A)",
    "(B)",
    "(C)",
    "(C) blue ball.",
    "The answer is (B).",
    "3",
];

#[tonic::async_trait]
impl GeneratorService for Replay {
    type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        let seed = req.sampling.and_then(|s| s.seed).unwrap_or(0);
        let items: Vec<Result<pb::GenerateResponse, Status>> = (0..req.n)
            .map(|i| {
                let text = OUTPUTS[((seed as usize) + i as usize) % OUTPUTS.len()];
                Ok(pb::GenerateResponse {
                    completion: Some(pb::Completion {
                        prompt_index: 0,
                        sample_index: i,
                        model_version: "replay".into(),
                        finish_reason: pb::FinishReason::Eos as i32,
                        text: text.into(),
                        token_ids: (0..12).collect(),
                        logprobs: vec![],
                        prompt_tokens: 200,
                        seed,
                    }),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
    async fn log_probs(
        &self,
        _: Request<pb::LogProbsRequest>,
    ) -> Result<Response<pb::LogProbsResponse>, Status> {
        Err(Status::unimplemented("replay"))
    }
    async fn swap_weights(
        &self,
        _: Request<pb::SwapWeightsRequest>,
    ) -> Result<Response<pb::SwapWeightsResponse>, Status> {
        Err(Status::unimplemented("replay"))
    }
    async fn upload_weights(
        &self,
        _: Request<tonic::Streaming<pb::UploadWeightsRequest>>,
    ) -> Result<Response<pb::SwapWeightsResponse>, Status> {
        Err(Status::unimplemented("replay"))
    }
    async fn get_model_info(
        &self,
        _: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        Ok(Response::new(pb::ModelInfo {
            version: "replay".into(),
            sha256: "0".repeat(64),
            ..Default::default()
        }))
    }
}

async fn run_once(
    store: &Store,
    generator: &str,
    tasks: &[i64],
    config: &RunConfig,
    write_batch: usize,
) -> (u64, f64) {
    let run = uuid::Uuid::new_v4();
    store
        .create_run(&NewRun {
            id: run,
            name: "bench".into(),
            policy: "hir".into(),
            config: serde_json::to_value(config).unwrap(),
        })
        .await
        .unwrap();
    store.add_run_tasks(run, tasks).await.unwrap();
    let sampler = Sampler {
        store: store.clone(),
        tasks: hir_store::TaskCache::new(
            hir_core::task::Catalog::discover(
                &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench"),
            )
            .unwrap(),
        ),
        generators: GeneratorPool::new(&[generator.to_string()], None).unwrap(),
        settings: SamplerSettings {
            concurrency: 32,
            write_batch,
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
                give_up: Duration::from_secs(10),
            },
            generator_up: Arc::new(tokio::sync::watch::channel(true).0),
        },
        metrics: Metrics::new(),
    };
    let (tx, rx) = tokio::sync::watch::channel(Progress::default());
    let t = Instant::now();
    sampler
        .sample_iteration(run, 1, &tx)
        .await
        .expect("iteration samples");
    let secs = t.elapsed().as_secs_f64();
    let samples = rx.borrow().samples;
    (samples, secs)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db = format!("hir_relabeler_bench_{}", std::process::id());
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("DATABASE_URL reaches Postgres");
    conn.execute(format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap();
    let url = format!("{}/{db}", admin.rsplit_once('/').unwrap().0);
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let generator = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GeneratorServiceServer::new(Replay))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let catalog = hir_core::task::Catalog::discover(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench"),
    )
    .unwrap();
    let mut all = Vec::new();
    for entry in catalog.entries() {
        let task = catalog.load(&entry.name).unwrap();
        all.push(
            hir_store::catalog::register(&store, &task, 1)
                .await
                .unwrap(),
        );
    }
    let tso3 = store
        .get_task_by_name("tracking_shuffled_objects_three_objects", 1)
        .await
        .unwrap()
        .id;

    // Bulk: every training prompt of the 12 tasks, 12 samples each (about 105k samples).
    let bulk = RunConfig {
        samples_per_prompt: 12,
        ..RunConfig::default()
    };
    let (bulk_samples, bulk_secs) = run_once(&store, &generator, &all, &bulk, 5000).await;
    // Row at a time: one task's 600 prompts x 4 samples, one sample per transaction.
    let single = RunConfig {
        samples_per_prompt: 4,
        ..RunConfig::default()
    };
    let (single_samples, single_secs) = run_once(&store, &generator, &[tso3], &single, 1).await;

    let (bulk_rate, single_rate) = (
        bulk_samples as f64 / bulk_secs,
        single_samples as f64 / single_secs,
    );
    println!("Relabeler with a replaying generator stand-in (gRPC on loopback), Postgres on this machine");
    println!("| writes | samples | seconds | samples/s (scored, relabeled, stored) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| batched, 5000 per transaction | {bulk_samples} | {bulk_secs:.2} | {bulk_rate:.0} |"
    );
    println!(
        "| one sample per transaction | {single_samples} | {single_secs:.2} | {single_rate:.0} |"
    );
    println!("\nbatched / row-at-a-time: {:.1}x", bulk_rate / single_rate);

    store.pool().close().await;
    conn.execute(format!("DROP DATABASE {db} WITH (FORCE)").as_str())
        .await
        .unwrap();
}
