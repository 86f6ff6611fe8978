//! The other models a generator serves: FLAN-T5 and LoRA adapters beside a base.

use super::*;

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

/// A LoRA adapter trained (in effect) on the fixture: its `B`s set to seeded values so it
/// changes what the model says. Returns the manifest's SHA-256 and the model it makes.
fn adapter_checkpoint(root: &Path, name: &str, targets: &str, seed: u64) -> (String, LoadedModel) {
    let cfg = hir_model::arch::lora::LoraConfig::from_knobs(4, 16.0, targets).unwrap();
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
            let w = hir_model::formats::weights::RandomSource::new(seed + i as u64, 0.5)
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
        let digests = ["adapter_config.json", "adapter_model.safetensors"].map(|f| {
            (
                f,
                hir_model::formats::checkpoint::sha256_file(&d.join(f)).unwrap(),
            )
        });
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
