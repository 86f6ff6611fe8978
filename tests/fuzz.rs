//! Request fuzzing: thousands of generated requests sent as raw bytes to every RPC of the
//! three services over real sockets: well-formed messages with random field values (empty,
//! NUL bytes, 300 KB strings, path escapes, numbers at their limits, NaN) and mutated bodies
//! (bit flips, overwritten, cut and appended bytes, wrong lengths). No reply may be INTERNAL or UNKNOWN (a fault of ours, or a panic that took
//! the connection down), and every service is still healthy at the end.
//!
//! `HIR_FUZZ_CASES` sets the mutations per RPC (default 150); `HIR_FUZZ_SEED` the seed.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, BufMut};
use hir_core::rng::SplitMix64;
use hir_proto::pb;
use hir_testkit::{Answers, Running, TestDb};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TOKEN: &str = "fuzz-token";

/// Sends raw bytes as the request body and drops the reply's bytes.
#[derive(Debug, Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Random field values of the kinds that break services: empty, NUL bytes, huge, non-ASCII,
/// and numbers at their limits.
struct Values<'a>(&'a mut SplitMix64);

impl Values<'_> {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n.max(1)
    }

    fn text(&mut self) -> String {
        match self.below(9) {
            0 => String::new(),
            1 => "tiny_mc".into(),
            2 => "a\0b".into(),
            3 => "x".repeat(1 + self.below(300_000) as usize),
            4 => "é🙂\u{202e}".repeat(1 + self.below(50) as usize),
            5 => uuid::Uuid::nil().to_string(),
            6 => "../../etc/hostname".into(),
            7 => format!("{}", self.0.next_u64()),
            _ => (0..self.below(40))
                .map(|_| char::from(32 + self.below(95) as u8))
                .collect(),
        }
    }

    fn uint(&mut self) -> u32 {
        match self.below(5) {
            0 => 0,
            1 => 1,
            2 => u32::MAX,
            3 => 1 << self.below(31),
            _ => self.below(100) as u32,
        }
    }

    fn float(&mut self) -> f32 {
        [0.0, 1.0, -1.0, f32::NAN, f32::INFINITY, 1e30, 0.5][self.below(7) as usize]
    }

    fn texts(&mut self) -> Vec<String> {
        (0..self.below(4)).map(|_| self.text()).collect()
    }
}

/// A request of `path` with random field values.
fn random_body(path: &str, v: &mut Values<'_>) -> Vec<u8> {
    use pb::upload_weights_request::Part;
    match path.rsplit('/').next().unwrap() {
        "Generate" => pb::GenerateRequest {
            prompts: v.texts(),
            n: v.uint(),
            sampling: Some(pb::SamplingParams {
                temperature: v.float(),
                top_k: v.uint(),
                top_p: v.float(),
                max_new_tokens: v.uint() % 8,
                stop: v.texts(),
                seed: Some(v.0.next_u64()),
            }),
            expected_version: v.text(),
            request_id: v.text(),
            ..Default::default()
        }
        .encode_to_vec(),
        "LogProbs" => pb::LogProbsRequest {
            items: vec![pb::LogProbsItem {
                prompt_token_ids: (0..v.below(8)).map(|_| v.uint()).collect(),
                continuation_token_ids: (0..v.below(8)).map(|_| v.uint()).collect(),
            }],
            expected_version: v.text(),
        }
        .encode_to_vec(),
        "SwapWeights" => pb::SwapWeightsRequest {
            checkpoint: v.text(),
            sha256: v.text(),
            version: v.text(),
            expected_version: v.text(),
        }
        .encode_to_vec(),
        "UploadWeights" => pb::UploadWeightsRequest {
            part: Some(Part::Header(pb::UploadHeader {
                version: v.text(),
                expected_version: v.text(),
                sha256: v.text(),
                files: (0..v.below(3))
                    .map(|_| pb::UploadFile {
                        name: v.text(),
                        size: u64::from(v.uint()),
                    })
                    .collect(),
            })),
        }
        .encode_to_vec(),
        "StartSampling" => pb::StartSamplingRequest {
            run_id: v.text(),
            iteration: v.uint(),
        }
        .encode_to_vec(),
        "GetSampling" | "WatchSampling" => pb::GetSamplingRequest {
            run_id: v.text(),
            iteration: v.uint(),
        }
        .encode_to_vec(),
        "Score" => pb::ScoreRequest {
            task: v.text(),
            example_index: v.uint(),
            output: v.text(),
        }
        .encode_to_vec(),
        "SubmitFeedback" => pb::SubmitFeedbackRequest {
            source: v.text(),
            policy: v.text(),
            run_id: v.text(),
            items: (0..v.below(3))
                .map(|_| pb::FeedbackItem {
                    external_id: v.text(),
                    instruction: v.text(),
                    query: v.text(),
                    output: v.text(),
                    correct: v.below(2) == 0,
                    answer: v.text(),
                })
                .collect(),
        }
        .encode_to_vec(),
        "StartRun" => pb::StartRunRequest {
            run_id: v.text(),
            name: v.text(),
            tasks: v.texts(),
            model: v.text(),
            policy: v.text(),
            hyperparameters: Some(pb::Hyperparameters {
                iterations: Some(v.uint()),
                samples_per_prompt: Some(v.uint()),
                max_new_tokens: Some(v.uint()),
                learning_rate: Some(f64::from(v.float())),
                preset: Some(v.text()),
                prompt_style: Some(v.text()),
                ..Default::default()
            }),
        }
        .encode_to_vec(),
        "GetRun" | "WatchRun" => pb::GetRunRequest { run_id: v.text() }.encode_to_vec(),
        "StopRun" => pb::StopRunRequest { run_id: v.text() }.encode_to_vec(),
        "ResumeRun" => pb::ResumeRunRequest { run_id: v.text() }.encode_to_vec(),
        "ListCheckpoints" => pb::ListCheckpointsRequest { run_id: v.text() }.encode_to_vec(),
        _ => Vec::new(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Unary,
    ServerStream,
    ClientStream,
}

/// One RPC: its path, shape, and a valid (or nearly valid) body to mutate.
struct Rpc {
    path: &'static str,
    shape: Shape,
    body: Vec<u8>,
}

/// A mutated copy of `body`.
fn mutate(body: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut b = body.to_vec();
    let pick = |rng: &mut SplitMix64, n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    for _ in 0..=pick(rng, 4) {
        match pick(rng, 6) {
            0 if !b.is_empty() => {
                let i = pick(rng, b.len());
                b[i] ^= 1 << pick(rng, 8);
            }
            1 if !b.is_empty() => {
                let i = pick(rng, b.len());
                b[i] = rng.next_u64() as u8;
            }
            2 if !b.is_empty() => b.truncate(pick(rng, b.len())),
            3 => {
                let n = pick(rng, 64);
                b.extend((0..n).map(|_| rng.next_u64() as u8));
            }
            4 => {
                // A field with a large length prefix, or a huge varint.
                b.extend([0x12, 0xff, 0xff, 0xff, 0x0f]);
            }
            _ => {
                let i = pick(rng, b.len() + 1);
                b.insert(i, rng.next_u64() as u8);
            }
        }
    }
    b
}

/// Sends one body; the status it ended with (OK included).
async fn call(channel: Channel, rpc: &Rpc, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Status::unavailable(e.to_string());
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(rpc.path);
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request.set_timeout(Duration::from_secs(20));
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        match rpc.shape {
            Shape::Unary => grpc.unary(request, path, RawCodec).await.map(|_| ()),
            Shape::ServerStream => {
                let mut s = grpc
                    .server_streaming(request, path, RawCodec)
                    .await?
                    .into_inner();
                // A watch of something that exists may stream on: a few messages suffice.
                for _ in 0..3 {
                    if s.message().await?.is_none() {
                        break;
                    }
                }
                Ok(())
            }
            Shape::ClientStream => {
                let (m, e) = (request.metadata().clone(), request.into_inner());
                let mut r = Request::new(tokio_stream::iter(vec![e]));
                *r.metadata_mut() = m;
                grpc.client_streaming(r, path, RawCodec).await.map(|_| ())
            }
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => Status::ok(""),
        Ok(Err(s)) => s,
        Err(_) => Status::deadline_exceeded("the fuzz call timed out"),
    }
}

fn rpcs() -> Vec<(usize, Rpc)> {
    use pb::upload_weights_request::Part;
    let e = |m: &dyn Fn() -> Vec<u8>| m();
    vec![
        (
            0,
            Rpc {
                path: "/hir.v1.GeneratorService/Generate",
                shape: Shape::ServerStream,
                body: e(&|| {
                    pb::GenerateRequest {
                        prompts: vec!["w2 w33 w10".into()],
                        n: 1,
                        sampling: Some(pb::SamplingParams {
                            temperature: 1.0,
                            top_k: 5,
                            top_p: 1.0,
                            max_new_tokens: 2,
                            stop: vec![],
                            seed: Some(1),
                        }),
                        ..Default::default()
                    }
                    .encode_to_vec()
                }),
            },
        ),
        (
            0,
            Rpc {
                path: "/hir.v1.GeneratorService/LogProbs",
                shape: Shape::Unary,
                body: pb::LogProbsRequest {
                    items: vec![pb::LogProbsItem {
                        prompt_token_ids: vec![1, 2, 3],
                        continuation_token_ids: vec![4, 5],
                    }],
                    expected_version: String::new(),
                }
                .encode_to_vec(),
            },
        ),
        (
            0,
            Rpc {
                path: "/hir.v1.GeneratorService/SwapWeights",
                shape: Shape::Unary,
                body: pb::SwapWeightsRequest {
                    checkpoint: "run/it001".into(),
                    sha256: "a".repeat(64),
                    version: "v1".into(),
                    expected_version: String::new(),
                }
                .encode_to_vec(),
            },
        ),
        (
            0,
            Rpc {
                path: "/hir.v1.GeneratorService/UploadWeights",
                shape: Shape::ClientStream,
                body: pb::UploadWeightsRequest {
                    part: Some(Part::Header(pb::UploadHeader {
                        version: "v1".into(),
                        expected_version: String::new(),
                        sha256: "a".repeat(64),
                        files: vec![pb::UploadFile {
                            name: "manifest.json".into(),
                            size: 10,
                        }],
                    })),
                }
                .encode_to_vec(),
            },
        ),
        (
            0,
            Rpc {
                path: "/hir.v1.GeneratorService/GetModelInfo",
                shape: Shape::Unary,
                body: pb::GetModelInfoRequest {}.encode_to_vec(),
            },
        ),
        (
            1,
            Rpc {
                path: "/hir.v1.RelabelerService/StartSampling",
                shape: Shape::Unary,
                body: pb::StartSamplingRequest {
                    run_id: uuid::Uuid::nil().to_string(),
                    iteration: 1,
                }
                .encode_to_vec(),
            },
        ),
        (
            1,
            Rpc {
                path: "/hir.v1.RelabelerService/GetSampling",
                shape: Shape::Unary,
                body: pb::GetSamplingRequest {
                    run_id: uuid::Uuid::nil().to_string(),
                    iteration: 1,
                }
                .encode_to_vec(),
            },
        ),
        (
            1,
            Rpc {
                path: "/hir.v1.RelabelerService/WatchSampling",
                shape: Shape::ServerStream,
                body: pb::GetSamplingRequest {
                    run_id: uuid::Uuid::nil().to_string(),
                    iteration: 1,
                }
                .encode_to_vec(),
            },
        ),
        (
            1,
            Rpc {
                path: "/hir.v1.RelabelerService/Score",
                shape: Shape::Unary,
                body: pb::ScoreRequest {
                    task: "tiny_mc".into(),
                    example_index: 3,
                    output: "w3".into(),
                }
                .encode_to_vec(),
            },
        ),
        (
            1,
            Rpc {
                path: "/hir.v1.RelabelerService/SubmitFeedback",
                shape: Shape::Unary,
                body: pb::SubmitFeedbackRequest {
                    source: "fuzz".into(),
                    items: vec![pb::FeedbackItem {
                        external_id: "x-1".into(),
                        instruction: "Answer the question.".into(),
                        query: "w2 w33".into(),
                        output: "w2".into(),
                        correct: true,
                        ..Default::default()
                    }],
                    ..Default::default()
                }
                .encode_to_vec(),
            },
        ),
        (
            2,
            Rpc {
                path: "/hir.v1.TrainerService/StartRun",
                shape: Shape::Unary,
                body: pb::StartRunRequest {
                    run_id: String::new(),
                    name: "fuzz".into(),
                    tasks: vec!["tiny_mc".into()],
                    model: "/nonexistent/model".into(),
                    policy: "hir".into(),
                    hyperparameters: Some(pb::Hyperparameters {
                        iterations: Some(1),
                        learning_rate: Some(1e-3),
                        ..Default::default()
                    }),
                }
                .encode_to_vec(),
            },
        ),
        (
            2,
            Rpc {
                path: "/hir.v1.TrainerService/GetRun",
                shape: Shape::Unary,
                body: pb::GetRunRequest {
                    run_id: uuid::Uuid::nil().to_string(),
                }
                .encode_to_vec(),
            },
        ),
        (
            2,
            Rpc {
                path: "/hir.v1.TrainerService/WatchRun",
                shape: Shape::ServerStream,
                body: pb::GetRunRequest {
                    run_id: uuid::Uuid::nil().to_string(),
                }
                .encode_to_vec(),
            },
        ),
        (
            2,
            Rpc {
                path: "/hir.v1.TrainerService/StopRun",
                shape: Shape::Unary,
                body: pb::StopRunRequest {
                    run_id: uuid::Uuid::nil().to_string(),
                }
                .encode_to_vec(),
            },
        ),
        (
            2,
            Rpc {
                path: "/hir.v1.TrainerService/ResumeRun",
                shape: Shape::Unary,
                body: pb::ResumeRunRequest {
                    run_id: uuid::Uuid::nil().to_string(),
                }
                .encode_to_vec(),
            },
        ),
        (
            2,
            Rpc {
                path: "/hir.v1.TrainerService/ListCheckpoints",
                shape: Shape::Unary,
                body: pb::ListCheckpointsRequest {
                    run_id: uuid::Uuid::nil().to_string(),
                }
                .encode_to_vec(),
            },
        ),
    ]
}

async fn healthy(channel: Channel) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("the service still answers")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_get_an_internal_error_or_take_a_service_down() {
    let cases: usize = std::env::var("HIR_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(150);
    let seed: u64 = std::env::var("HIR_FUZZ_SEED")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1);
    let db = TestDb::create("fuzz").await;
    let root = std::env::temp_dir().join(format!("hir-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let bigbench = hir_testkit::tiny_task(&root.join("bigbench"), 10, Answers::Alternating);
    std::fs::create_dir_all(root.join("checkpoints")).unwrap();

    let mut g = hir_testkit::generator_config(hir_testkit::llama_fixture());
    g.auth.token = Some(TOKEN.into());
    g.swap.checkpoint_root = Some(root.join("checkpoints"));
    g.swap.staging_dir = root.join("staging");
    let (generator, _g): (String, Running) = hir_testkit::spawn_generator(g).await;
    let (relabeler, _r) = hir_testkit::spawn_relabeler(hir_testkit::relabeler_config(
        &db.url,
        &bigbench,
        vec![generator.clone()],
        TOKEN,
    ))
    .await;
    let (trainer, _t) = hir_testkit::spawn_trainer(hir_testkit::trainer_config(
        &db.url,
        &bigbench,
        &relabeler,
        vec![generator.clone()],
        TOKEN,
        &root,
    ))
    .await;
    let mut channels = Vec::new();
    for url in [&generator, &relabeler, &trainer] {
        channels.push(
            Channel::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }

    let mut rng = SplitMix64::new(seed);
    let mut codes: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut faults = Vec::new();
    let mut sent = 0;
    for (service, rpc) in rpcs() {
        for case in 0..=cases {
            // Case 0 is the body as built; then random field values and mutated bytes in turn.
            let body = match case {
                0 => rpc.body.clone(),
                c if c % 2 == 1 => random_body(rpc.path, &mut Values(&mut rng)),
                _ => mutate(&rpc.body, &mut rng),
            };
            let status = call(channels[service].clone(), &rpc, body.clone()).await;
            sent += 1;
            *codes
                .entry(rpc.path.to_string())
                .or_default()
                .entry(format!("{:?}", status.code()))
                .or_default() += 1;
            if matches!(status.code(), Code::Internal | Code::Unknown) {
                faults.push(format!(
                    "{} case {case} ({} bytes: {:02x?}): {:?} {}",
                    rpc.path,
                    body.len(),
                    &body[..body.len().min(48)],
                    status.code(),
                    status.message()
                ));
            }
        }
    }
    for (path, by_code) in &codes {
        eprintln!("{path}: {by_code:?}");
    }
    eprintln!("{sent} requests, {} faults", faults.len());
    assert!(
        faults.is_empty(),
        "replies that blame us:\n{}",
        faults.join("\n")
    );
    for channel in channels {
        healthy(channel).await;
    }
    let _ = std::fs::remove_dir_all(&root);
    db.drop_db().await;
}
