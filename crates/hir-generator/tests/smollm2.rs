//! The generator serving the real SmolLM2-135M-Instruct (Q4_1 GGUF, re-quantized to Q8_0 at
//! load), fetched into models/ by scripts/fetch-model.sh when missing.

use std::path::PathBuf;

use hir_generator::config::GeneratorConfig;
use hir_generator::Application;
use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;

fn smollm2() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        let status = std::process::Command::new("bash")
            .arg(root.join("scripts/fetch-model.sh"))
            .status()
            .unwrap();
        assert!(status.success(), "scripts/fetch-model.sh failed");
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_smollm2_over_grpc() {
    let config = GeneratorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        model: smollm2(),
        ..GeneratorConfig::default()
    };
    let app = Application::build(config).await.expect("SmolLM2 loads");
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(app.run_until(async { drop(stopped.await) }));
    let mut client = GeneratorServiceClient::connect(format!("http://{addr}"))
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
    stop.send(()).unwrap();
    done.await.unwrap().unwrap();
}
