//! Compiles `proto/hir/v1/*.proto` with a vendored `protoc`, so a build needs no system
//! protobuf compiler, and writes the descriptor set that reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = ["common", "generator", "relabeler", "trainer"]
        .iter()
        .map(|f| proto_root.join(format!("hir/v1/{f}.proto")))
        .collect();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let includes = [proto_root.clone(), protoc_bin_vendored::include_path()?];
    tonic_prost_build::configure()
        .codec_path("crate::codec::HirCodec")
        .file_descriptor_set_path(out_dir.join("hir_v1_descriptor.bin"))
        .compile_with_config(config, &files, &includes)?;
    // Each file, not the folder: cargo's check of a folder missed edits to the files in it
    // for some of the build's configurations, which then compiled stale types.
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}
