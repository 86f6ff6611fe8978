//! The generator as clients see it: a real server on port 0, a real gRPC client, the tiny
//! Llama fixture (random weights, 64-word vocabulary, 128-token context) and the tiny
//! FLAN-T5 fixture.

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

#[tokio::test]
async fn completions_stream_with_their_tags() {
    let mut s = start("tags", |_| {}).await;
    let got = collect(
        &mut s.client,
        request(&["w2 w3 w4", "w5", "w6 w7 w8 w9 w10"], 2, 1.0, 12, Some(7)),
    )
    .await
    .unwrap();
    assert_eq!(got.len(), 6);
    let keys: HashSet<(u32, u32)> = got
        .iter()
        .map(|c| (c.prompt_index, c.sample_index))
        .collect();
    assert_eq!(
        keys,
        (0..3).flat_map(|p| (0..2).map(move |i| (p, i))).collect()
    );
    for c in &got {
        assert_eq!(c.model_version, "base");
        assert_eq!(c.seed, 7);
        assert!(c.token_ids.len() <= 12);
        assert_eq!(c.logprobs.len(), c.token_ids.len());
        assert!(c.logprobs.iter().all(|&lp| lp <= 0.0 && lp.is_finite()));
        let expected_prompt = [3, 1, 5][c.prompt_index as usize];
        assert_eq!(c.prompt_tokens, expected_prompt);
        let reason = pb::FinishReason::try_from(c.finish_reason).unwrap();
        assert!(
            reason == pb::FinishReason::Eos
                || (reason == pb::FinishReason::Length && c.token_ids.len() == 12)
        );
    }
    let info = s.info().await;
    assert_eq!(
        (
            info.version.as_str(),
            info.architecture.as_str(),
            info.vocab_size,
            info.context_length
        ),
        ("base", "llama", 64, 128)
    );
    s.stop().await;
}

#[tokio::test]
async fn seeds_reproduce_and_greedy_is_deterministic() {
    let mut s = start("seeds", |_| {}).await;
    let sorted = |mut v: Vec<pb::Completion>| {
        v.sort_by_key(|c| (c.prompt_index, c.sample_index));
        v.into_iter().map(|c| c.token_ids).collect::<Vec<_>>()
    };
    let a = sorted(
        collect(
            &mut s.client,
            request(&["w2 w3", "w4"], 3, 1.0, 16, Some(42)),
        )
        .await
        .unwrap(),
    );
    let b = sorted(
        collect(
            &mut s.client,
            request(&["w2 w3", "w4"], 3, 1.0, 16, Some(42)),
        )
        .await
        .unwrap(),
    );
    let c = sorted(
        collect(
            &mut s.client,
            request(&["w2 w3", "w4"], 3, 1.0, 16, Some(43)),
        )
        .await
        .unwrap(),
    );
    assert_eq!(a, b, "same seed, same samples");
    assert_ne!(a, c, "another seed, other samples");
    let g1 = sorted(
        collect(&mut s.client, request(&["w9 w8"], 2, 0.0, 16, None))
            .await
            .unwrap(),
    );
    let g2 = sorted(
        collect(&mut s.client, request(&["w9 w8"], 2, 0.0, 16, None))
            .await
            .unwrap(),
    );
    assert_eq!(g1, g2);
    assert_eq!(g1[0], g1[1], "greedy samples of one prompt agree");
    s.stop().await;
}

#[tokio::test]
async fn teacher_forced_logprobs_match_sampling() {
    let mut s = start("logprobs", |_| {}).await;
    let got = collect(&mut s.client, request(&["w2 w3 w4"], 1, 1.0, 10, Some(3)))
        .await
        .unwrap();
    let c = &got[0];
    if c.token_ids.is_empty() {
        return s.stop().await; // sampled EOS at once: nothing to compare
    }
    let probe = pb::LogProbsRequest {
        items: vec![pb::LogProbsItem {
            prompt_token_ids: vec![2, 3, 4],
            continuation_token_ids: c.token_ids.clone(),
        }],
        expected_version: "base".into(),
    };
    let r = s.client.log_probs(probe).await.unwrap().into_inner();
    assert_eq!(r.model_version, "base");
    for (a, b) in r.results[0].logprobs.iter().zip(&c.logprobs) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
    s.stop().await;
}

#[tokio::test]
async fn concurrent_clients_share_batches() {
    let s = start("share", |c| c.engine.max_batch_sequences = 64).await;
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let mut client = s.client.clone();
        tasks.push(tokio::spawn(async move {
            collect(&mut client, request(&["w2 w3 w4 w5"], 2, 1.0, 96, Some(i)))
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().len(), 2);
    }
    let peak = scrape(s.metrics, "hir_generator_peak_running_sequences").await;
    assert!(
        peak > 2.0,
        "requests of 2 sequences each never ran together (peak {peak})"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_completion_does_not_depend_on_what_decodes_beside_it() {
    let s = start("isolated", |c| c.engine.max_batch_sequences = 64).await;
    let target = || request(&["w2 w3 w4"], 2, 1.0, 24, Some(5));
    let numbers = |mut v: Vec<pb::Completion>| {
        v.sort_by_key(|c| c.sample_index);
        v.into_iter()
            .map(|c| {
                (
                    c.token_ids,
                    c.logprobs.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>()
    };
    let alone = numbers(collect(&mut s.client.clone(), target()).await.unwrap());
    // The same request again while longer and shorter prompts decode, so that a shared
    // batch would pad it differently and compute its rows with other batch sizes.
    let mut others = Vec::new();
    for i in 0..8u64 {
        let mut client = s.client.clone();
        let prompt = ["w7", "w9 w8 w7 w6 w5 w4 w3 w2 w9 w8 w7 w6"][i as usize % 2];
        others.push(tokio::spawn(async move {
            collect(&mut client, request(&[prompt], 3, 1.0, 48, Some(100 + i)))
                .await
                .unwrap()
        }));
    }
    let crowded = numbers(collect(&mut s.client.clone(), target()).await.unwrap());
    for t in others {
        t.await.unwrap();
    }
    let peak = scrape(s.metrics, "hir_generator_peak_running_sequences").await;
    assert!(peak > 2.0, "the request never had company (peak {peak})");
    assert_eq!(alone, crowded, "tokens and log-probabilities, bit for bit");
    s.stop().await;
}

#[tokio::test]
async fn a_cancelled_request_frees_its_sequences() {
    let mut s = start("cancel", |_| {}).await;
    let stream = s
        .client
        .generate(request(&["w2 w3"], 8, 1.0, 120, Some(1)))
        .await
        .unwrap()
        .into_inner();
    drop(stream);
    // The engine notices at its next step; poll the gauge until it reads zero.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if scrape(s.metrics, "hir_generator_running_sequences").await == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cancelled sequences were never freed"
        );
        tokio::task::yield_now().await;
    }
    // The server still answers normally.
    assert_eq!(
        collect(&mut s.client, request(&["w2"], 1, 0.0, 4, None))
            .await
            .unwrap()
            .len(),
        1
    );
    s.stop().await;
}

#[tokio::test]
async fn swap_under_load_never_mixes_versions() {
    let mut s = start("swap", |_| {}).await;
    let sha = perturbed_checkpoint(&s.root, "v2", 3.0);
    let mut streams = Vec::new();
    for i in 0..4u64 {
        let mut client = s.client.clone();
        streams.push(tokio::spawn(async move {
            collect(
                &mut client,
                request(&["w2 w3 w4", "w7"], 2, 1.0, 100, Some(i)),
            )
            .await
        }));
    }
    let swap = pb::SwapWeightsRequest {
        checkpoint: "v2".into(),
        sha256: sha,
        version: "v2".into(),
        expected_version: "base".into(),
    };
    let r = s
        .client
        .swap_weights(authed(swap))
        .await
        .expect("swap succeeds")
        .into_inner();
    assert_eq!(
        (r.version.as_str(), r.previous_version.as_str()),
        ("v2", "base")
    );
    assert!(r.total_ms > 0.0 && r.bytes > 0);
    for t in streams {
        let completions = t
            .await
            .unwrap()
            .expect("streams running during the swap finish");
        assert_eq!(completions.len(), 4);
        let versions: HashSet<&str> = completions
            .iter()
            .map(|c| c.model_version.as_str())
            .collect();
        assert_eq!(versions.len(), 1, "one request, one version: {versions:?}");
    }
    let after = collect(&mut s.client, request(&["w2"], 1, 0.0, 4, None))
        .await
        .unwrap();
    assert_eq!(after[0].model_version, "v2");
    let info = s.info().await;
    assert_eq!(info.version, "v2");
    s.stop().await;
}

#[tokio::test]
async fn bad_swaps_leave_the_old_version_serving() {
    let mut s = start("badswap", |_| {}).await;
    let sha = perturbed_checkpoint(&s.root, "good", 2.0);
    // Unauthenticated.
    let req = pb::SwapWeightsRequest {
        checkpoint: "good".into(),
        sha256: sha.clone(),
        version: "v2".into(),
        expected_version: String::new(),
    };
    assert_eq!(
        s.client.swap_weights(req.clone()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut wrong = req.clone();
    wrong.checkpoint = "../escape".into();
    assert_eq!(
        s.client
            .swap_weights(authed(wrong))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let mut wrong = req.clone();
    wrong.sha256 = "0".repeat(64);
    let err = s.client.swap_weights(authed(wrong)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("SHA-256"), "{}", err.message());
    let mut wrong = req.clone();
    wrong.expected_version = "someone-else".into();
    let err = s.client.swap_weights(authed(wrong)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("another swap happened first"),
        "{}",
        err.message()
    );
    // A corrupt weight file behind an intact manifest.
    let corrupt = s.root.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    for f in std::fs::read_dir(s.root.join("good")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, corrupt.join(f.file_name().unwrap())).unwrap();
    }
    let weights = corrupt.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();
    let mut bad = req.clone();
    bad.checkpoint = "corrupt".into();
    let err = s.client.swap_weights(authed(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("model.safetensors"),
        "{}",
        err.message()
    );
    let info = s.info().await;
    assert_eq!(
        info.version, "base",
        "every failed swap leaves the old version serving"
    );
    // The good one still works, once; its name cannot be reused.
    s.client.swap_weights(authed(req.clone())).await.unwrap();
    assert_eq!(
        s.client.swap_weights(authed(req)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    s.stop().await;
}

#[tokio::test]
async fn uploads_swap_weights_without_a_shared_disk() {
    let mut s = start("upload", |c| c.swap.checkpoint_root = None).await;
    let src = scratch("upload-src");
    let sha = perturbed_checkpoint(&src, "v2", 0.5);
    let dir = src.join("v2");
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    let header = pb::UploadHeader {
        version: "uploaded".into(),
        expected_version: "base".into(),
        sha256: sha,
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
    let r = s
        .client
        .upload_weights(authed(tokio_stream::iter(messages.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, "uploaded");
    assert_eq!(
        collect(&mut s.client, request(&["w2"], 1, 0.0, 2, None))
            .await
            .unwrap()[0]
            .model_version,
        "uploaded"
    );
    // Out-of-order chunks are refused.
    let mut shuffled = messages.clone();
    if let Some(pb::upload_weights_request::Part::Header(h)) = &mut shuffled[0].part {
        h.version = "again".into();
        h.expected_version = String::new();
    }
    let name_of = |m: &pb::UploadWeightsRequest| match &m.part {
        Some(pb::upload_weights_request::Part::Chunk(c)) => Some(c.name.clone()),
        _ => None,
    };
    let i = (1..shuffled.len() - 1)
        .find(|&i| name_of(&shuffled[i]) == name_of(&shuffled[i + 1]))
        .expect("a file of several chunks");
    shuffled.swap(i, i + 1);
    let err = s
        .client
        .upload_weights(authed(tokio_stream::iter(shuffled)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // References are refused without a checkpoint root.
    let req = pb::SwapWeightsRequest {
        checkpoint: "x".into(),
        sha256: "a".repeat(64),
        version: "x".into(),
        expected_version: String::new(),
    };
    assert_eq!(
        s.client.swap_weights(authed(req)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let staged: Vec<_> = std::fs::read_dir(s.root.join("staging"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(staged.is_empty(), "staging folders are removed");
    let _ = std::fs::remove_dir_all(&src);
    s.stop().await;
}

#[tokio::test]
async fn every_invalid_field_is_named() {
    let mut s = start("invalid", |c| c.limits.max_n = 8).await;
    let ok = request(&["w2 w3"], 1, 1.0, 8, None);
    let long = vec!["w5"; 125].join(" ");
    let cases: Vec<(&str, pb::GenerateRequest)> = vec![
        (
            "prompts",
            pb::GenerateRequest {
                prompts: vec![],
                ..ok.clone()
            },
        ),
        (
            "prompts[1]",
            pb::GenerateRequest {
                prompts: vec!["w2".into(), " ".into()],
                ..ok.clone()
            },
        ),
        (
            "prompts[0]",
            pb::GenerateRequest {
                prompts: vec![long],
                ..ok.clone()
            },
        ),
        ("n", pb::GenerateRequest { n: 0, ..ok.clone() }),
        ("n", pb::GenerateRequest { n: 9, ..ok.clone() }),
        (
            "sampling.temperature",
            with_sampling(&ok, |p| p.temperature = f32::NAN),
        ),
        (
            "sampling.temperature",
            with_sampling(&ok, |p| p.temperature = -1.0),
        ),
        ("sampling.top_p", with_sampling(&ok, |p| p.top_p = 1.5)),
        ("sampling.top_p", with_sampling(&ok, |p| p.top_p = -0.1)),
        (
            "sampling.max_new_tokens",
            with_sampling(&ok, |p| p.max_new_tokens = 0),
        ),
        (
            "sampling.max_new_tokens",
            with_sampling(&ok, |p| p.max_new_tokens = 1_000_000),
        ),
        (
            "sampling.stop[0]",
            with_sampling(&ok, |p| p.stop = vec![String::new()]),
        ),
    ];
    for (field, req) in cases {
        let err = collect(&mut s.client, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
    let err = collect(
        &mut s.client,
        pb::GenerateRequest {
            expected_version: "nope".into(),
            ..ok.clone()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("nope"), "{}", err.message());
    // A prompt that is not UTF-8, sent with a hand-made message.
    let err = raw_generate(s.channel.clone(), b"\xff\xfe not utf-8")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("UTF-8"), "{}", err.message());
    s.stop().await;
}

fn with_sampling(
    req: &pb::GenerateRequest,
    f: impl FnOnce(&mut pb::SamplingParams),
) -> pb::GenerateRequest {
    let mut r = req.clone();
    f(r.sampling.as_mut().unwrap());
    r
}

/// `GenerateRequest` with `prompts` as raw bytes, to send what a string field cannot hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGenerateRequest {
    #[prost(bytes = "vec", repeated, tag = "1")]
    prompts: Vec<Vec<u8>>,
    #[prost(uint32, tag = "2")]
    n: u32,
}

async fn raw_generate(channel: Channel, prompt: &[u8]) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/hir.v1.GeneratorService/Generate");
    let codec = tonic_prost::ProstCodec::<RawGenerateRequest, pb::GenerateResponse>::default();
    let req = RawGenerateRequest {
        prompts: vec![prompt.to_vec()],
        n: 1,
    };
    let mut stream = grpc
        .server_streaming(Request::new(req), path, codec)
        .await?
        .into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

#[tokio::test]
async fn health_and_graceful_shutdown() {
    let mut s = start("health", |_| {}).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hir.v1.GeneratorService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // A stream running when shutdown starts still completes.
    let mut client = s.client.clone();
    let running = tokio::spawn(async move {
        collect(&mut client, request(&["w2 w3"], 4, 1.0, 100, Some(5))).await
    });
    // Wait until the engine has admitted it, then stop the server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while scrape(s.metrics, "hir_generator_running_sequences").await == 0.0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    s.stop.take().unwrap().send(()).unwrap();
    let completions = running
        .await
        .unwrap()
        .expect("the running stream finishes during shutdown");
    assert_eq!(completions.len(), 4);
    s.done.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&s.root);
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_at_once() {
    let s = start("full", |c| {
        c.engine.queue_capacity = 1;
        c.engine.max_batch_sequences = 2;
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let mut client = s.client.clone();
        tasks.push(tokio::spawn(async move {
            collect(&mut client, request(&["w2 w3"], 2, 1.0, 120, Some(i))).await
        }));
    }
    let mut exhausted = 0;
    let mut served = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(c) => {
                assert_eq!(c.len(), 2);
                served += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("queue is full"),
                    "{}",
                    status.message()
                );
                exhausted += 1;
            }
        }
    }
    assert!(
        served >= 1 && exhausted >= 1,
        "served {served}, refused {exhausted}"
    );
    assert_eq!(
        scrape(s.metrics, "hir_generator_rejected_requests_total").await,
        exhausted as f64
    );
    s.stop().await;
}

#[tokio::test]
async fn a_model_that_fails_to_load_ends_the_server_with_the_reason() {
    let config = GeneratorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        model: PathBuf::from("/no/such/model"),
        ..GeneratorConfig::default()
    };
    let app = Application::bind(config)
        .await
        .expect("binding needs no model");
    let err = app.run_until(std::future::pending()).await.unwrap_err();
    assert!(format!("{err:#}").contains("/no/such/model"), "{err:#}");
}

#[tokio::test]
async fn text_never_contains_the_end_of_sequence_token() {
    // The fixture's tokenizer does not mark `<eos>` special; the text must still omit it.
    let mut s = start("eos-text", |_| {}).await;
    let got = collect(&mut s.client, request(&["w2 w3 w4"], 16, 1.0, 64, Some(11)))
        .await
        .unwrap();
    assert!(
        got.iter()
            .any(|c| c.finish_reason == pb::FinishReason::Eos as i32),
        "some sample ends with EOS"
    );
    for c in &got {
        assert!(!c.text.contains("<eos>"), "{:?}", c.text);
    }
    s.stop().await;
}

#[tokio::test]
async fn serves_and_swaps_a_t5_model() {
    let mut s = start("t5", |c| c.model = t5_fixture()).await;
    let info = s.info().await;
    assert_eq!(
        (
            info.architecture.as_str(),
            info.vocab_size,
            info.context_length
        ),
        ("t5", 64, 512)
    );
    let sorted = |mut v: Vec<pb::Completion>| {
        v.sort_by_key(|c| (c.prompt_index, c.sample_index));
        v
    };
    let req = || request(&["w5 w6 w7", "w9"], 3, 1.0, 8, Some(5));
    let a = sorted(collect(&mut s.client, req()).await.unwrap());
    let b = sorted(collect(&mut s.client, req()).await.unwrap());
    assert_eq!(a.len(), 6);
    assert_eq!(
        a.iter().map(|c| &c.token_ids).collect::<Vec<_>>(),
        b.iter().map(|c| &c.token_ids).collect::<Vec<_>>(),
        "the same seed gives the same samples"
    );
    for c in &a {
        assert_eq!(c.model_version, "base");
        // The encoder input ends with </s>.
        assert_eq!(c.prompt_tokens, [4, 2][c.prompt_index as usize]);
        assert!(c.token_ids.len() <= 8 && c.logprobs.len() == c.token_ids.len());
    }
    // Teacher-forced log-probabilities of a sample equal those it was sampled with.
    let c = a
        .iter()
        .find(|c| !c.token_ids.is_empty())
        .expect("a non-empty sample");
    let prompt_ids = [vec![5, 6, 7, 1], vec![9, 1]][c.prompt_index as usize].clone();
    let probe = |expected: &str| pb::LogProbsRequest {
        items: vec![pb::LogProbsItem {
            prompt_token_ids: prompt_ids.clone(),
            continuation_token_ids: c.token_ids.clone(),
        }],
        expected_version: expected.into(),
    };
    let before = s
        .client
        .log_probs(probe("base"))
        .await
        .unwrap()
        .into_inner();
    for (x, y) in before.results[0].logprobs.iter().zip(&c.logprobs) {
        assert!((x - y).abs() < 1e-3, "{x} vs {y}");
    }
    // A T5 checkpoint swaps in; a Llama one cannot replace a T5 model.
    let sha = perturbed_checkpoint_of(&t5_fixture(), &s.root, "t5v2", 3.0);
    let swap = |checkpoint: &str, sha256: String, version: &str| pb::SwapWeightsRequest {
        checkpoint: checkpoint.into(),
        sha256,
        version: version.into(),
        expected_version: String::new(),
    };
    let llama_sha = perturbed_checkpoint(&s.root, "llama", 1.0);
    let err = s
        .client
        .swap_weights(authed(swap("llama", llama_sha, "bad")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let r = s
        .client
        .swap_weights(authed(swap("t5v2", sha, "v2")))
        .await
        .expect("a T5 checkpoint swaps in")
        .into_inner();
    assert_eq!(
        (r.version.as_str(), r.previous_version.as_str()),
        ("v2", "base")
    );
    let after = s.client.log_probs(probe("v2")).await.unwrap().into_inner();
    assert_eq!(after.model_version, "v2");
    assert_ne!(after.results[0].logprobs, before.results[0].logprobs);
    let got = collect(&mut s.client, req()).await.unwrap();
    assert!(got.iter().all(|c| c.model_version == "v2"));
    s.stop().await;
}

#[tokio::test]
async fn swapped_checkpoints_are_held_as_the_weights_setting_says() {
    for (weights, dtype) in [
        (hir_generator::config::Weights::Auto, "f32"),
        (hir_generator::config::Weights::Quantized, "quantized"),
    ] {
        let mut s = start(&format!("weights-{dtype}"), |c| c.weights = weights).await;
        assert_eq!(s.info().await.dtype, dtype, "{weights:?} at start");
        let sha = perturbed_checkpoint(&s.root, "v2", 2.0);
        let swap = pb::SwapWeightsRequest {
            checkpoint: "v2".into(),
            sha256: sha,
            version: "v2".into(),
            expected_version: "base".into(),
        };
        s.client.swap_weights(authed(swap)).await.unwrap();
        let info = s.info().await;
        assert_eq!((info.version.as_str(), info.dtype.as_str()), ("v2", dtype));
        let got = collect(&mut s.client, request(&["w2 w3"], 2, 1.0, 8, Some(1)))
            .await
            .unwrap();
        assert!(got.iter().all(|c| c.model_version == "v2"));
        s.stop().await;
    }
}

/// The messages of an upload of the checkpoint folder `dir`: its header, then every file in
/// chunks.
fn upload_messages(dir: &Path, version: &str, sha256: &str) -> Vec<pb::UploadWeightsRequest> {
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
        expected_version: String::new(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_prompts_are_refused_at_once_and_never_stall_health() {
    // The fixture with a context of 2^20 tokens, so that prompts of megabytes can be within
    // the byte limit of a prompt.
    let model = scratch("large-model");
    copy_folder(&fixture(), &model);
    let config = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    cfg["max_position_embeddings"] = serde_json::Value::from(1u64 << 20);
    std::fs::write(&config, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let s = start("large", |c| {
        c.model = model.clone();
        c.limits.max_prompt_tokens = 1 << 20;
        c.engine.token_budget = 1 << 20;
    })
    .await;
    let mut client = s.client.clone();
    let info = client.get_model_info(pb::GetModelInfoRequest {}).await;
    let limits = info.unwrap().into_inner().limits.unwrap();
    assert_eq!(
        limits.max_prompt_bytes,
        8 << 20,
        "8 bytes per token of 2^20"
    );
    let max_prompt_bytes = limits.max_prompt_bytes as usize;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let check = pb_health_check();
    // Over the byte limit: refused before any work, naming the prompt and its size.
    let huge = "w5 ".repeat(5_000_000);
    assert!(huge.len() > max_prompt_bytes);
    let started = std::time::Instant::now();
    let err = collect(&mut client, request(&[&huge], 1, 1.0, 4, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("prompts[0]:") && err.message().contains("bytes"),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused after {:?}",
        started.elapsed()
    );
    // Prompts each within the limit, together over the request's: refused at once too.
    assert_eq!(
        limits.max_request_bytes,
        8 << 20,
        "8 bytes per token of the budget"
    );
    let half = "w5 ".repeat(1_500_000);
    let started = std::time::Instant::now();
    let err = collect(&mut client, request(&[&half, &half], 1, 1.0, 4, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("prompts:") && err.message().contains("bytes in all"),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Three prompts within the byte limit but too many tokens: tokenized, then refused.
    // Health answers promptly all along.
    let large = std::sync::Arc::new("w5 ".repeat(1_500_000));
    assert!(large.len() <= max_prompt_bytes);
    let mut calls = Vec::new();
    for _ in 0..3 {
        let (mut client, large) = (s.client.clone(), std::sync::Arc::clone(&large));
        calls.push(tokio::spawn(async move {
            collect(&mut client, request(&[large.as_str()], 1, 1.0, 4, None)).await
        }));
    }
    let (mut slowest, mut checks) = (Duration::ZERO, 0);
    while calls.iter().any(|c| !c.is_finished()) {
        let t = std::time::Instant::now();
        health.check(check.clone()).await.unwrap();
        slowest = slowest.max(t.elapsed());
        checks += 1;
    }
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("tokens"), "{}", err.message());
    }
    assert!(
        checks > 0,
        "no health check ran while the prompts were handled"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a health check took {slowest:?} while large prompts were handled ({checks} checks)"
    );
    s.stop().await;
    let _ = std::fs::remove_dir_all(&model);
}

fn pb_health_check() -> tonic_health::pb::HealthCheckRequest {
    tonic_health::pb::HealthCheckRequest {
        service: "hir.v1.GeneratorService".into(),
    }
}

#[tokio::test]
async fn checkpoints_never_reach_outside_their_root() {
    let mut s = start("confined", |_| {}).await;
    let good_sha = perturbed_checkpoint(&s.root, "good", 2.0);
    let good = s.root.join("good");
    // A file outside the root, and its digest, which no reply may ever quote.
    let outside = scratch("confined-outside");
    let secret = outside.join("secret.bin");
    std::fs::write(&secret, b"not for clients").unwrap();
    let mut forbidden = vec![hir_generator::swap::sha256_hex(b"not for clients")];
    if let Ok(bytes) = std::fs::read("/etc/hostname") {
        forbidden.push(hir_generator::swap::sha256_hex(&bytes));
    }
    // A file inside the root but outside any checkpoint folder.
    std::fs::write(s.root.join("x"), b"beside the checkpoints").unwrap();
    forbidden.push(hir_generator::swap::sha256_hex(b"beside the checkpoints"));
    let zeros = "0".repeat(64);
    let secret_path = secret.to_str().unwrap().to_string();
    let mut cases: Vec<(String, String)> = Vec::new();
    for (name, listed) in [
        ("absolute", "/etc/hostname"),
        ("absolute-secret", secret_path.as_str()),
        ("parent", "../x"),
    ] {
        let dir = s.root.join(name);
        copy_folder(&good, &dir);
        cases.push((name.into(), add_to_manifest(&dir, &[(listed, &zeros)])));
    }
    // A listed file that is a link out of the root.
    let dir = s.root.join("listed-link");
    copy_folder(&good, &dir);
    std::os::unix::fs::symlink(&secret, dir.join("extra.bin")).unwrap();
    cases.push((
        "listed-link".into(),
        add_to_manifest(&dir, &[("extra.bin", &zeros)]),
    ));
    // A file the loader reads that is a link out of the root, to a copy of the very bytes
    // the manifest expects.
    let dir = s.root.join("loader-link");
    copy_folder(&good, &dir);
    std::fs::copy(good.join("tokenizer.json"), outside.join("tokenizer.json")).unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(outside.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    cases.push(("loader-link".into(), good_sha.clone()));
    for (name, sha256) in cases {
        let req = pb::SwapWeightsRequest {
            checkpoint: name.clone(),
            sha256,
            version: name.clone(),
            expected_version: String::new(),
        };
        let err = s.client.swap_weights(authed(req)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        for digest in &forbidden {
            assert!(!err.message().contains(digest), "{name}: {}", err.message());
        }
    }
    // The same manifests uploaded.
    for (name, listed) in [
        ("up-absolute", "/etc/hostname"),
        ("up-secret", secret_path.as_str()),
        ("up-parent", "../x"),
    ] {
        let dir = outside.join(name);
        copy_folder(&good, &dir);
        let sha256 = add_to_manifest(&dir, &[(listed, &zeros)]);
        let messages = upload_messages(&dir, name, &sha256);
        let err = s
            .client
            .upload_weights(authed(tokio_stream::iter(messages)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        for digest in &forbidden {
            assert!(!err.message().contains(digest), "{name}: {}", err.message());
        }
    }
    assert_eq!(s.info().await.version, "base", "nothing was swapped in");
    // Links that stay inside the root are followed.
    let dir = s.root.join("inner-link");
    copy_folder(&good, &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        good.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let req = pb::SwapWeightsRequest {
        checkpoint: "inner-link".into(),
        sha256: good_sha,
        version: "inner-link".into(),
        expected_version: "base".into(),
    };
    s.client.swap_weights(authed(req)).await.unwrap();
    assert_eq!(s.info().await.version, "inner-link");
    let _ = std::fs::remove_dir_all(&outside);
    s.stop().await;
}

#[tokio::test]
async fn an_upload_file_name_with_a_nul_is_an_invalid_argument() {
    let mut s = start("nul-name", |c| c.swap.checkpoint_root = None).await;
    let header = pb::UploadHeader {
        version: "nul".into(),
        expected_version: String::new(),
        sha256: "a".repeat(64),
        files: vec![
            pb::UploadFile {
                name: "manifest.json".into(),
                size: 2,
            },
            pb::UploadFile {
                name: "a\0b".into(),
                size: 1,
            },
        ],
    };
    let chunk = |name: &str, data: &[u8]| pb::UploadWeightsRequest {
        part: Some(pb::upload_weights_request::Part::Chunk(pb::FileChunk {
            name: name.into(),
            offset: 0,
            data: data.to_vec(),
        })),
    };
    let messages = vec![
        pb::UploadWeightsRequest {
            part: Some(pb::upload_weights_request::Part::Header(header)),
        },
        chunk("manifest.json", b"{}"),
        chunk("a\0b", b"x"),
    ];
    let err = s
        .client
        .upload_weights(authed(tokio_stream::iter(messages)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("header.files[1].name:"),
        "{}",
        err.message()
    );
    assert_eq!(s.info().await.version, "base");
    s.stop().await;
}

#[tokio::test]
async fn oversize_messages_are_resource_exhausted() {
    let mut s = start("oversize", |c| {
        c.limits.max_message_bytes = 64 << 10;
        c.swap.checkpoint_root = None;
    })
    .await;
    let big = "w5 ".repeat(30_000);
    let err = collect(&mut s.client, request(&[&big], 1, 1.0, 4, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let probe = pb::LogProbsRequest {
        items: vec![pb::LogProbsItem {
            prompt_token_ids: vec![5; 100_000],
            continuation_token_ids: vec![5],
        }],
        expected_version: String::new(),
    };
    let err = s.client.log_probs(probe).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // A chunk of an upload over the limit.
    let header = pb::UploadHeader {
        version: "big".into(),
        expected_version: String::new(),
        sha256: "a".repeat(64),
        files: vec![pb::UploadFile {
            name: "manifest.json".into(),
            size: 100_000,
        }],
    };
    let messages = vec![
        pb::UploadWeightsRequest {
            part: Some(pb::upload_weights_request::Part::Header(header)),
        },
        pb::UploadWeightsRequest {
            part: Some(pb::upload_weights_request::Part::Chunk(pb::FileChunk {
                name: "manifest.json".into(),
                offset: 0,
                data: vec![b' '; 100_000],
            })),
        },
    ];
    let err = s
        .client
        .upload_weights(authed(tokio_stream::iter(messages)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The server still answers.
    assert_eq!(s.info().await.version, "base");
    s.stop().await;
}

#[tokio::test]
async fn the_advertised_limits_are_the_enforced_ones() {
    let mut s = start("limits", |_| {}).await;
    let limits = s.info().await.limits.expect("limits are advertised");
    let words = |k: usize| format!("w{}", 2 + k % 60);
    let prompts = |k: u32| (0..k as usize).map(words).collect::<Vec<_>>();
    let generate = |prompts: Vec<String>, n: u32| pb::GenerateRequest {
        prompts,
        ..request(&[], n, 1.0, 2, Some(1))
    };
    // Prompts: exactly the limit passes, one more is refused.
    let at = limits.max_prompts_per_request;
    let got = collect(&mut s.client, generate(prompts(at), 1))
        .await
        .unwrap_or_else(|e| panic!("{at} prompts: {e:?}"));
    assert_eq!(got.len(), at as usize);
    let err = collect(&mut s.client, generate(prompts(at + 1), 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("prompts:"), "{}", err.message());
    // n: the same.
    let at = limits.max_n;
    let got = collect(&mut s.client, generate(prompts(1), at))
        .await
        .unwrap_or_else(|e| panic!("n = {at}: {e:?}"));
    assert_eq!(got.len(), at as usize);
    let err = collect(&mut s.client, generate(prompts(1), at + 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("n:"), "{}", err.message());
    // Sequences (prompts times n): the same.
    let at = limits.max_sequences_per_request;
    assert!(at < limits.max_prompts_per_request * limits.max_n);
    let (p, n) = (at / 8, 8);
    assert_eq!(p * n, at, "the limit splits into {p} prompts of 8 samples");
    let got = collect(&mut s.client, generate(prompts(p), n))
        .await
        .unwrap_or_else(|e| panic!("{p} prompts, n = {n}: {e:?}"));
    assert_eq!(got.len(), at as usize);
    let err = collect(&mut s.client, generate(prompts(p + 1), n))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("n:"), "{}", err.message());
    // Prompt bytes: the same, before tokenizing.
    let at = limits.max_prompt_bytes as usize;
    assert_eq!(at, 8 * limits.max_prompt_tokens as usize);
    let err = collect(&mut s.client, generate(vec!["w5".repeat(at / 2 + 1)], 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("prompts[0]:") && err.message().contains("bytes"),
        "{}",
        err.message()
    );
    // One word the vocabulary does not know: a single token.
    let got = collect(&mut s.client, generate(vec!["w5".repeat(at / 2)], 1))
        .await
        .unwrap_or_else(|e| panic!("a prompt of {at} bytes: {e:?}"));
    assert_eq!(got.len(), 1);
    assert_eq!(limits.max_message_bytes, 16 << 20);
    s.stop().await;
}

/// A LoRA adapter trained (in effect) on the fixture: its `B`s set to seeded values so it
/// changes what the model says. Returns the manifest's SHA-256 and the model it makes.
fn adapter_checkpoint(root: &Path, name: &str, targets: &str, seed: u64) -> (String, LoadedModel) {
    let cfg = hir_model::lora::LoraConfig::from_knobs(4, 16.0, targets).unwrap();
    let lm = LoadedModel::load_lora(
        &fixture(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
        &cfg,
        None,
        seed,
    )
    .unwrap();
    for (i, (n, var)) in lm.vars().iter().enumerate() {
        if n.ends_with("lora_B.weight") {
            let w = hir_model::weights::RandomSource::new(seed + i as u64, 0.5)
                .tensor(n, var.dims(), &candle_core::Device::Cpu)
                .unwrap();
            var.set(&w).unwrap();
        }
    }
    let dir = root.join(name);
    lm.save(&dir).unwrap();
    let sha = hir_generator::swap::sha256_hex(&std::fs::read(dir.join("manifest.json")).unwrap());
    (sha, lm)
}

fn greedy(prompt: &str) -> pb::GenerateRequest {
    request(&[prompt], 1, 0.0, 12, None)
}

#[tokio::test]
async fn adapters_swap_beside_the_base_and_bad_ones_are_refused() {
    let mut s = start("lora", |_| {}).await;
    let prompt = "w2 w3 w4";
    let base_text = collect(&mut s.client, greedy(prompt)).await.unwrap()[0]
        .text
        .clone();
    let (sha, trained) = adapter_checkpoint(&s.root, "a1", "q_proj,v_proj,down_proj", 3);
    let swap = |checkpoint: &str, sha: &str, version: &str| pb::SwapWeightsRequest {
        checkpoint: checkpoint.into(),
        sha256: sha.into(),
        version: version.into(),
        expected_version: String::new(),
    };
    let r = s
        .client
        .swap_weights(authed(swap("a1", &sha, "a1")))
        .await
        .expect("an adapter of the served base swaps in")
        .into_inner();
    assert!(
        r.bytes < 64 << 10,
        "only the adapter is read: {} bytes",
        r.bytes
    );
    let served = collect(&mut s.client, greedy(prompt)).await.unwrap();
    assert_eq!(served[0].model_version, "a1");
    // What the generator serves is what the trainer's model computes.
    let params = hir_model::SamplingParams::greedy(12);
    let want = trained
        .generate_text(&[prompt.to_string()], &params)
        .unwrap();
    assert_eq!(served[0].text, want[0][0].text);
    assert_ne!(served[0].text, base_text, "the adapter changes the answer");

    // A second adapter goes beside the base, not beside the first one.
    let (sha2, second) = adapter_checkpoint(&s.root, "a2", "o_proj", 5);
    s.client
        .swap_weights(authed(swap("a2", &sha2, "a2")))
        .await
        .unwrap();
    let served = collect(&mut s.client, greedy(prompt)).await.unwrap();
    let want = second
        .generate_text(&[prompt.to_string()], &params)
        .unwrap();
    assert_eq!(served[0].text, want[0][0].text);

    // Unusable adapters: INVALID_ARGUMENT naming the field; a2 keeps serving.
    let copy = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let d = s.root.join(name);
        copy_folder(&s.root.join("a1"), &d);
        edit(&d);
        let digests = ["adapter_config.json", "adapter_model.safetensors"]
            .map(|f| (f, hir_model::checkpoint::sha256_file(&d.join(f)).unwrap()));
        add_to_manifest(&d, &digests.each_ref().map(|(f, h)| (*f, h.as_str())))
    };
    let set_config = |key: &'static str, value: serde_json::Value| {
        move |d: &Path| {
            let p = d.join("adapter_config.json");
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            v[key] = value.clone();
            std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        }
    };
    let other_base = |d: &Path| {
        let m = d.join("manifest.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
        v["base_model_sha256"] = "0".repeat(64).into();
        std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    for (name, edit, field) in [
        (
            "rank0",
            &set_config("r", 0.into()) as &dyn Fn(&Path),
            "checkpoint: adapter_config.json: r: ",
        ),
        (
            "unknown",
            &set_config("target_modules", serde_json::json!(["q_proj", "c_attn"])),
            "checkpoint: adapter_config.json: target_modules: ",
        ),
        (
            // Rank 20 on k_proj, which maps 32 features to 16.
            "wide",
            &|d: &Path| {
                set_config("r", 20.into())(d);
                set_config("target_modules", serde_json::json!(["k_proj"]))(d);
                let mut t = std::collections::HashMap::new();
                for i in 0..2 {
                    let m = format!("base_model.model.model.layers.{i}.self_attn.k_proj");
                    let dev = candle_core::Device::Cpu;
                    t.insert(
                        format!("{m}.lora_A.weight"),
                        candle_core::Tensor::zeros((20, 32), candle_core::DType::F32, &dev)
                            .unwrap(),
                    );
                    t.insert(
                        format!("{m}.lora_B.weight"),
                        candle_core::Tensor::zeros((16, 20), candle_core::DType::F32, &dev)
                            .unwrap(),
                    );
                }
                candle_core::safetensors::save(&t, d.join("adapter_model.safetensors")).unwrap();
            },
            "checkpoint: adapter_config.json: r: ",
        ),
        (
            "otherbase",
            &other_base,
            "checkpoint: manifest.json: base_model_sha256: ",
        ),
    ] {
        let sha = copy(name, edit);
        let err = s
            .client
            .swap_weights(authed(swap(name, &sha, name)))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(field),
            "{name}: {}",
            err.message()
        );
    }
    assert_eq!(
        s.info().await.version,
        "a2",
        "the old version keeps serving"
    );

    // After a whole checkpoint swaps in, adapters of the first base no longer fit it.
    let full = perturbed_checkpoint(&s.root, "full", 2.0);
    s.client
        .swap_weights(authed(swap("full", &full, "full")))
        .await
        .unwrap();
    let err = s
        .client
        .swap_weights(authed(swap("a1", &sha, "a1-again")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("base_model_sha256"),
        "{}",
        err.message()
    );
    s.stop().await;
}
