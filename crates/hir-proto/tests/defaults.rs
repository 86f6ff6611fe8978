//! The knob defaults written in `trainer.proto`'s comments (`[value]` at the end of each
//! `Hyperparameters` field's comment) are the defaults `hir_core::run::RunConfig` declares:
//! the wire documents what a run gets when it leaves a field unset.

use hir_core::run::RunConfig;

/// `(field, bracketed default)` of every field of `message Hyperparameters`.
fn documented_defaults() -> Vec<(String, String)> {
    let proto = include_str!("../../../proto/hir/v1/trainer.proto");
    let start = proto
        .find("message Hyperparameters {")
        .expect("trainer.proto declares Hyperparameters");
    let body = &proto[start..start + proto[start..].find("\n}").unwrap()];
    let mut comment = String::new();
    let mut out = Vec::new();
    for line in body.lines().skip(1) {
        let line = line.trim();
        if let Some(c) = line.strip_prefix("//") {
            comment.push_str(c);
            comment.push(' ');
        } else if let Some(decl) = line.strip_prefix("optional ") {
            let name = decl.split_whitespace().nth(1).unwrap().to_string();
            let open = comment
                .rfind('[')
                .unwrap_or_else(|| panic!("{name}: no [default]"));
            let close = comment[open..].find(']').unwrap() + open;
            out.push((name, comment[open + 1..close].to_string()));
            comment.clear();
        }
    }
    out
}

#[test]
fn the_proto_documents_the_run_configs_defaults() {
    let defaults = serde_json::to_value(RunConfig::default()).unwrap();
    let documented = documented_defaults();
    assert!(documented.len() >= 30, "{} fields read", documented.len());
    for (name, doc) in documented {
        let want = defaults
            .get(&name)
            .unwrap_or_else(|| panic!("{name} is not a RunConfig knob"));
        // The value is what comes before any explanation: `1: every iteration`, `"x", PEFT's`.
        let value = if let Some(quoted) = doc.strip_prefix('"') {
            format!("\"{}\"", &quoted[..quoted.find('"').unwrap()])
        } else {
            doc.split([':', ',']).next().unwrap().trim().to_string()
        };
        let agrees = match want {
            serde_json::Value::Number(n) => {
                let v = if value == "unset" {
                    0.0
                } else {
                    value.parse::<f64>().unwrap_or(f64::NAN)
                };
                (n.as_f64().unwrap() - v).abs() <= f64::EPSILON * v.abs().max(1.0)
            }
            serde_json::Value::Bool(b) => value == b.to_string(),
            serde_json::Value::String(s) => value == format!("\"{s}\""),
            other => panic!("{name}: unexpected default {other}"),
        };
        assert!(
            agrees,
            "trainer.proto documents {name} as [{doc}], RunConfig's default is {want}"
        );
    }
}
