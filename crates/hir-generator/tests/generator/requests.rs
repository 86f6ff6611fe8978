//! Requests the generator refuses, and the limits it advertises and enforces.

use super::*;

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
