//! The crate's modules form layers: each module uses only the modules declared before it in
//! `lib.rs` (error, kernels, formats, arch, sampling, train, probe, loaded). This reads every
//! source file and fails on a `crate::` path that reaches up, so no file circle comes back.

use std::path::{Path, PathBuf};

/// The top-level modules of `src/lib.rs`, in declaration order.
fn layers(src: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))?;
            rest.strip_suffix(';').map(str::to_string)
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_uses_a_module_above_it() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let order = layers(&src);
    assert_eq!(
        order,
        ["error", "kernels", "formats", "arch", "sampling", "train", "probe", "loaded"],
        "lib.rs declares the layers in this order"
    );
    let rank = |m: &str| order.iter().position(|o| o == m);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs");
        let Some(own) = rank(top) else {
            continue; // lib.rs itself
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for (i, _) in line.match_indices("crate::") {
                let used: String = line[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if rank(&used).is_some_and(|r| r > own) {
                    upward.push(format!("{}:{}: crate::{used}", rel.display(), n + 1));
                }
            }
        }
    }
    assert!(files.len() > 30, "read {} files", files.len());
    assert!(
        upward.is_empty(),
        "modules reaching up a layer:\n{}",
        upward.join("\n")
    );
}
