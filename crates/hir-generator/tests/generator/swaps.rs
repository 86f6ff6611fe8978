//! Swapping weights from a checkpoint folder or an upload: versions never mix, bad checkpoints are refused, paths stay inside their root.

use super::*;

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
    let messages = upload_messages(&dir, "uploaded", "base", &sha);
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
        let messages = upload_messages(&dir, name, "", &sha256);
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
