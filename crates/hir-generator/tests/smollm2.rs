//! The generator serving the real SmolLM2-135M-Instruct (Q4_1 GGUF, re-quantized to Q8_0 at
//! load), fetched into models/ by scripts/fetch-model.sh when missing.

use std::path::PathBuf;

use hir_generator::config::GeneratorConfig;
use hir_generator::Application;
use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;

fn smollm2() -> PathBuf {
    hir_runtime::models::fetch_smollm2(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .expect("SmolLM2 is fetched")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_smollm2_over_grpc() {
    let config = GeneratorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        model: smollm2(),
        ..GeneratorConfig::default()
    };
    // Bind only: the model loads while health already answers.
    let app = Application::bind(config).await.expect("binds");
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(app.run_until(async { drop(stopped.await) }));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GeneratorServiceClient::new(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = |mut h: tonic_health::pb::health_client::HealthClient<
        tonic::transport::Channel,
    >| async move {
        h.check(tonic_health::pb::HealthCheckRequest {
            service: "hir.v1.GeneratorService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    // Loading and warming up SmolLM2 takes about a second; these calls take milliseconds.
    assert_eq!(
        status(health.clone()).await,
        ServingStatus::NotServing as i32,
        "not serving while loading"
    );
    let early = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(early.code(), tonic::Code::Unavailable);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    while status(health.clone()).await != ServingStatus::Serving as i32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the model never finished loading"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            info.architecture.as_str(),
            info.vocab_size,
            info.eos_token_id
        ),
        ("llama", 49152, 2)
    );

    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let request = pb::GenerateRequest {
        prompts: vec![
            prompt.into(),
            "Solve the question with correct answer.\n\nQ: What is 2 + 2?\nA:".into(),
        ],
        n: 2,
        sampling: Some(pb::SamplingParams {
            temperature: 0.0,
            max_new_tokens: 12,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut completions = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        completions.push(r.completion.unwrap());
    }
    assert_eq!(completions.len(), 4);
    let paris = completions.iter().find(|c| c.prompt_index == 0).unwrap();
    assert!(paris.text.contains("Paris"), "{:?}", paris.text);
    for c in &completions {
        let twin = completions
            .iter()
            .find(|d| d.prompt_index == c.prompt_index && d.sample_index != c.sample_index)
            .unwrap();
        assert_eq!(
            c.token_ids, twin.token_ids,
            "greedy samples of one prompt agree"
        );
        assert_eq!(c.model_version, "base");
    }

    // `chat` wraps the plain question in the model's template, with its default system
    // turn: the same completion as that text sent raw. (Whether greedy decoding still says
    // "Paris" after a system turn depends on the CPU's rounding; the check above does not.)
    let question = "What is the capital of France?";
    let templated = hir_model::LoadedModel::load(
        &smollm2(),
        &hir_model::parse_device("cpu").unwrap(),
        hir_model::WeightMode::QuantizedAsIs,
    )
    .unwrap()
    .chat_prompt(question);
    assert!(
        templated.starts_with("<|im_start|>system\n"),
        "{templated:?}"
    );
    let mut answers = Vec::new();
    for (prompt, chat) in [(question.to_string(), true), (templated, false)] {
        let request = pb::GenerateRequest {
            prompts: vec![prompt],
            n: 1,
            chat,
            sampling: Some(pb::SamplingParams {
                temperature: 0.0,
                max_new_tokens: 12,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut stream = client.generate(request).await.unwrap().into_inner();
        answers.push(stream.message().await.unwrap().unwrap().completion.unwrap());
    }
    let (chat, raw) = (&answers[0], &answers[1]);
    assert!(!chat.token_ids.is_empty());
    assert_eq!(
        chat.token_ids, raw.token_ids,
        "{:?} / {:?}",
        chat.text, raw.text
    );
    assert_eq!(chat.prompt_tokens, raw.prompt_tokens);
    assert!(
        chat.prompt_tokens > paris.prompt_tokens,
        "the system turn is added: {} tokens",
        chat.prompt_tokens
    );
    stop.send(()).unwrap();
    done.await.unwrap().unwrap();
}
