//! Layered, typed configuration.
//!
//! A service describes its settings as a `serde` struct with defaults. [`load`] starts from
//! those defaults, merges a TOML file if one is given, then environment variables named
//! `HIR_<SERVICE>__<FIELD>` (nested fields separated by `__`, e.g.
//! `HIR_GENERATOR__LIMITS__MAX_N=16`). Unknown keys in the file are errors, so a typo is
//! reported instead of silently ignored.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Result, RuntimeError};

/// Loads `T` from its defaults, then `file` (which must exist if given), then the
/// environment with prefix `HIR_<SERVICE>__`.
pub fn load<T>(service: &str, file: Option<&Path>) -> Result<T>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(RuntimeError::Config(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let prefix = format!("HIR_{}__", service.to_ascii_uppercase());
    from_figment(figment.merge(Env::prefixed(&prefix).split("__")))
}

/// Loads `T` from its defaults and the given `key=value` overrides (dotted keys), with no
/// file and no environment: for tests and embedding.
pub fn from_pairs<T>(pairs: &[(&str, &str)]) -> Result<T>
where
    T: Serialize + DeserializeOwned + Default,
{
    // Dotted TOML keys (`limits.max_n = 5`) address nested fields.
    let toml: String = pairs
        .iter()
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect();
    let figment = Figment::from(Serialized::defaults(T::default())).merge(Toml::string(&toml));
    from_figment(figment)
}

/// What every placeholder secret of `.env.example` starts with.
pub const PLACEHOLDER_SECRET: &str = "change-me";

/// Refuses to start with a secret still at a placeholder of `.env.example` (a token, or the
/// password inside a database URL), naming every such setting: the placeholders are public.
pub fn refuse_placeholder_secrets<'a>(
    secrets: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<()> {
    let named: Vec<&str> = secrets
        .into_iter()
        .filter(|(_, value)| value.is_some_and(|v| v.contains(PLACEHOLDER_SECRET)))
        .map(|(name, _)| name)
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    Err(RuntimeError::Config(format!(
        "{} still hold{} the placeholder of .env.example ({PLACEHOLDER_SECRET}…); set a real secret",
        named.join(", "),
        if named.len() == 1 { "s" } else { "" }
    )))
}

fn from_figment<T: DeserializeOwned>(figment: Figment) -> Result<T> {
    figment.extract().map_err(|e| {
        let all: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
        RuntimeError::Config(all.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Limits {
        max_n: u32,
    }
    impl Default for Limits {
        fn default() -> Self {
            Self { max_n: 8 }
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Settings {
        listen: String,
        limits: Limits,
    }

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("hir-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn file_values_override_defaults() {
        let path = write("ok", "listen = \"0.0.0.0:1\"\n[limits]\nmax_n = 3\n");
        let s: Settings = load("testsvc", Some(&path)).unwrap();
        assert_eq!(
            s,
            Settings {
                listen: "0.0.0.0:1".into(),
                limits: Limits { max_n: 3 }
            }
        );
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        let path = write("typo", "[limits]\nmax_m = 3\n");
        let err = load::<Settings>("testsvc", Some(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_m"), "{err}");
        let err = load::<Settings>("testsvc", Some(Path::new("/no/such.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such.toml does not exist"), "{err}");
    }

    #[test]
    fn placeholder_secrets_are_refused_by_name() {
        assert!(refuse_placeholder_secrets([
            ("auth.token", Some("3f9c1a7be0d24c6e")),
            ("generator_token", None),
            (
                "database_url",
                Some("postgres://hindsight:s3cret-pw@postgres/hindsight")
            ),
        ])
        .is_ok());
        let err = refuse_placeholder_secrets([
            ("auth_token", Some("change-me-dev-token")),
            ("generator_token", Some("3f9c1a7be0d24c6e")),
            (
                "database_url",
                Some("postgres://hindsight:change-me-dev-password@postgres:5432/hindsight"),
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("auth_token, database_url still hold"), "{err}");
        assert!(!err.contains("generator_token"), "{err}");
        assert!(
            !err.contains("dev-password"),
            "a secret is never echoed: {err}"
        );
    }

    #[test]
    fn pairs_override_nested_fields() {
        let s: Settings = from_pairs(&[("limits.max_n", "5")]).unwrap();
        assert_eq!(s.limits.max_n, 5);
        assert!(from_pairs::<Settings>(&[("limits.max_n", "\"x\"")]).is_err());
    }
}
