//! Sampling as clients see it: tags, seeds, log-probabilities, batching, cancellation.

use super::*;

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
