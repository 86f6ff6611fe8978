//! Checking that a starting model can be trained without loading it: what `StartRun`
//! asks before it accepts a run, so that a garbage or truncated file is refused at once
//! instead of failing the run later. Reads headers only, never the weights.

use std::path::Path;

use hir_core::text_enum::bounded;

use crate::error::ModelError;
use crate::formats::safetensors_files;

/// Largest safetensors header read when a model is checked.
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// The first line of an error's message: dependencies may append a backtrace.
fn first_line(err: &dyn std::fmt::Display) -> String {
    bounded(hir_core::text_enum::first_line(&err.to_string()))
}

/// Reads enough of a starting model to know that training can load it: a folder's
/// `config.json`, the headers of its safetensors files and its tokenizer; a GGUF file's
/// header and the extent of its tensors. Returns the architecture (`model_type`, or the
/// GGUF `general.architecture`), or why the model cannot be trained.
pub fn probe(path: &Path) -> std::result::Result<String, String> {
    if path.is_dir() {
        probe_folder(path)
    } else {
        probe_gguf(path)
    }
}

/// Checks LoRA settings against the starting model without loading its weights: a
/// Llama-family model whose targeted projections are all at least `cfg.rank` wide.
pub fn check_lora(path: &Path, cfg: &crate::arch::lora::LoraConfig) -> crate::Result<()> {
    let config: crate::arch::llama::Config = if path.is_dir() {
        let p = path.join("config.json");
        let bytes = std::fs::read(&p).map_err(|e| ModelError::io(&p, e))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| ModelError::json(&p, e))?;
        let kind = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
        if !matches!(kind, "llama" | "qwen2") {
            return Err(ModelError::InvalidAdapter {
                field: "lora_rank".into(),
                reason: format!(
                    "LoRA adapters are trained on Llama-family models; this model is {:?}",
                    bounded(kind)
                ),
            });
        }
        serde_json::from_value(v).map_err(|e| ModelError::json(&p, e))?
    } else {
        crate::arch::llama::gguf::GgufFile::read_header(path)?.llama_config()?
    };
    cfg.check_widths(&config, "lora_rank")
}

fn probe_folder(dir: &Path) -> std::result::Result<String, String> {
    let config = std::fs::read(dir.join("config.json"))
        .map_err(|e| format!("has an unreadable config.json: {e}"))?;
    let config: serde_json::Value = serde_json::from_slice(&config)
        .map_err(|e| format!("has a config.json that is not JSON: {e}"))?;
    let model_type = config
        .get("model_type")
        .and_then(|t| t.as_str())
        .unwrap_or_default()
        .to_owned();
    if !matches!(model_type.as_str(), "llama" | "qwen2" | "t5") {
        return Err(format!(
            "is a {:?} model; runs train llama, qwen2 (SmolLM2, Llama, Qwen2) and t5 \
             (FLAN-T5) models",
            bounded(&model_type)
        ));
    }
    let files = safetensors_files(dir).map_err(|e| match e {
        ModelError::MissingFile { .. } => {
            "has no model.safetensors or model.safetensors.index.json".to_owned()
        }
        other => format!(
            "has an unusable model.safetensors.index.json ({})",
            first_line(&other)
        ),
    })?;
    for file in &files {
        check_safetensors(file)?;
    }
    if !dir.join("tokenizer.json").is_file() {
        return Err("has no tokenizer.json".into());
    }
    Ok(model_type)
}

/// Reads a safetensors file's header and checks that every tensor it lists lies inside
/// the file.
fn check_safetensors(file: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let name = file
        .file_name()
        .map(|n| bounded(&n.to_string_lossy()))
        .unwrap_or_default();
    let not = |why: String| format!("has a {name} that is not a safetensors file ({why})");
    let mut f = std::fs::File::open(file).map_err(|e| format!("cannot read {name}: {e}"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot read {name}: {e}"))?
        .len();
    let mut size = [0u8; 8];
    f.read_exact(&mut size)
        .map_err(|_| not(format!("only {len} bytes")))?;
    let size = u64::from_le_bytes(size);
    if size > MAX_SAFETENSORS_HEADER || size > len - 8 {
        return Err(not(format!("a header of {size} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; size as usize];
    f.read_exact(&mut header)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    let tensors: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| not(format!("its header: {e}")))?;
    let data = len - 8 - size;
    for (tensor, info) in &tensors {
        if tensor == "__metadata__" {
            continue;
        }
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| not(format!("tensor {:?} has no data_offsets", bounded(tensor))))?;
        if end > data {
            return Err(format!(
                "has a truncated {name}: tensor {:?} ends at byte {end} of {data}",
                bounded(tensor)
            ));
        }
    }
    Ok(())
}

fn probe_gguf(path: &Path) -> std::result::Result<String, String> {
    use candle_core::quantized::gguf_file;
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot be read: {e}"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot be read: {e}"))?
        .len();
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| format!("is not a readable GGUF file: {}", first_line(&e)))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or("is a GGUF file without general.architecture")?;
    if !matches!(arch.as_str(), "llama" | "qwen2") {
        return Err(format!(
            "is a GGUF {:?} model; runs train llama and qwen2 GGUF files",
            bounded(&arch)
        ));
    }
    for (name, info) in &content.tensor_infos {
        // Checked: the sizes come from the file.
        let end = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .map(|n| n / info.ggml_dtype.block_size().max(1) as u64)
            .and_then(|blocks| blocks.checked_mul(info.ggml_dtype.type_size() as u64))
            .and_then(|bytes| bytes.checked_add(info.offset))
            .and_then(|end| end.checked_add(content.tensor_data_offset))
            .unwrap_or(u64::MAX);
        if end > len {
            return Err(format!(
                "is a truncated GGUF file: tensor {:?} ends at byte {end} of {len}",
                bounded(name)
            ));
        }
    }
    Ok(arch)
}
