//! The generator as clients see it: a real server on port 0, a real gRPC client, the tiny
//! Llama fixture (random weights, 64-word vocabulary, 128-token context) and the tiny
//! FLAN-T5 fixture.

mod lifecycle;
mod models;
mod requests;
mod sampling;
mod swaps;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hir_generator::config::GeneratorConfig;
use hir_generator::Application;
use hir_model::{LoadedModel, WeightMode};
use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "t0ken";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hir-model/tests/fixtures/llama")
}

fn t5_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hir-model/tests/fixtures/t5")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hir-gen-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Server {
    client: GeneratorServiceClient<Channel>,
    channel: Channel,
    metrics: std::net::SocketAddr,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(name: &str, tweak: impl FnOnce(&mut GeneratorConfig)) -> Server {
    let root = scratch(name);
    let mut config = GeneratorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        model: fixture(),
        ..GeneratorConfig::default()
    };
    config.swap.checkpoint_root = Some(root.clone());
    config.swap.staging_dir = root.join("staging");
    config.auth.token = Some(TOKEN.into());
    config.shutdown_grace_secs = 30;
    tweak(&mut config);
    let app = Application::build(config).await.expect("generator starts");
    let addr = app.local_addr();
    let metrics = app.metrics_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(app.run_until(async { drop(stopped.await) }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server {
        client: GeneratorServiceClient::new(channel.clone()),
        channel,
        metrics,
        root,
        stop: Some(stop),
        done,
    }
}

fn request(
    prompts: &[&str],
    n: u32,
    temperature: f32,
    max_new: u32,
    seed: Option<u64>,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        n,
        sampling: Some(pb::SamplingParams {
            temperature,
            top_k: 50,
            top_p: 1.0,
            max_new_tokens: max_new,
            stop: vec![],
            seed,
        }),
        return_logprobs: true,
        ..Default::default()
    }
}

async fn collect(
    client: &mut GeneratorServiceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Vec<pb::Completion>, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(item) = stream.message().await? {
        out.push(
            item.completion
                .expect("every response carries a completion"),
        );
    }
    Ok(out)
}

fn authed<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

async fn scrape(addr: std::net::SocketAddr, metric: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(metric)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{metric} not in {text}"))
}

/// Writes the fixture with one weight changed as a checkpoint `name` under `root`; returns
/// the SHA-256 of its manifest.
fn perturbed_checkpoint(root: &Path, name: &str, scale: f64) -> String {
    perturbed_checkpoint_of(&fixture(), root, name, scale)
}

/// [`perturbed_checkpoint`] of another model folder.
fn perturbed_checkpoint_of(model: &Path, root: &Path, name: &str, scale: f64) -> String {
    let model = LoadedModel::load(
        model,
        &candle_core::Device::Cpu,
        WeightMode::Trainable(candle_core::DType::F32),
    )
    .unwrap();
    let (_, var) = model
        .vars()
        .iter()
        .find(|(n, _)| n == "lm_head.weight")
        .expect("lm_head.weight is a var");
    var.set(&(var.as_tensor() * scale).unwrap()).unwrap();
    let dir = root.join(name);
    model.save(&dir).unwrap();
    hir_generator::swap::sha256_hex(&std::fs::read(dir.join("manifest.json")).unwrap())
}

impl Server {
    /// What the server says it serves.
    async fn info(&mut self) -> pb::ModelInfo {
        self.client
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.done.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The messages of an upload of the checkpoint folder `dir` as `version` (swapping only
/// from `expected`, unless empty): its header, then every file in chunks.
fn upload_messages(
    dir: &Path,
    version: &str,
    expected: &str,
    sha256: &str,
) -> Vec<pb::UploadWeightsRequest> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    let header = pb::UploadHeader {
        version: version.into(),
        expected_version: expected.into(),
        sha256: sha256.into(),
        files: files
            .iter()
            .map(|(n, b)| pb::UploadFile {
                name: n.clone(),
                size: b.len() as u64,
            })
            .collect(),
    };
    let mut messages = vec![pb::UploadWeightsRequest {
        part: Some(pb::upload_weights_request::Part::Header(header)),
    }];
    for (name, bytes) in &files {
        for (i, chunk) in bytes.chunks(10_000).enumerate() {
            messages.push(pb::UploadWeightsRequest {
                part: Some(pb::upload_weights_request::Part::Chunk(pb::FileChunk {
                    name: name.clone(),
                    offset: (i * 10_000) as u64,
                    data: chunk.to_vec(),
                })),
            });
        }
    }
    messages
}

/// Copies the checkpoint folder `from` to `to` (links are copied as the files they point
/// to).
fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

/// Adds `entries` (name, SHA-256) to `dir/manifest.json`, dropping any BLAKE3 it had for
/// those names (so the file is checked by the SHA-256); returns the manifest's new SHA-256.
fn add_to_manifest(dir: &Path, entries: &[(&str, &str)]) -> String {
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (name, digest) in entries {
        manifest["files"][*name] = serde_json::Value::from(*digest);
        if let Some(b3) = manifest.get_mut("blake3").and_then(|v| v.as_object_mut()) {
            b3.remove(*name);
        }
    }
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    hir_generator::swap::sha256_hex(&bytes)
}

fn pb_health_check() -> tonic_health::pb::HealthCheckRequest {
    tonic_health::pb::HealthCheckRequest {
        service: "hir.v1.GeneratorService".into(),
    }
}
