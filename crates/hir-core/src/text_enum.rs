//! Enumerations with one fixed spelling each, used by the store's `TEXT` columns, the CLI
//! and logs.
//!
//! [`text_enum!`](crate::text_enum!) declares a Rust enum together with its spelling, so
//! every such type converts the same way in both directions.

/// Declares an enum whose variants are spelled as fixed strings.
///
/// The generated type gets `ALL`, `as_str`, `Display`, `FromStr` and `TryFrom<String>`
/// (used by `#[sqlx(try_from = "String")]` when the store decodes rows). Parsing an unknown
/// string yields [`CoreError::InvalidArgument`](crate::CoreError::InvalidArgument) naming
/// the type and the accepted spellings.
#[macro_export]
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The variant's spelling, as stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::CoreError;

            fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    other => Err($crate::CoreError::InvalidArgument {
                        field: stringify!($name),
                        reason: format!(
                            "must be one of {:?}, got {:?}",
                            [$($text),+],
                            $crate::text_enum::bounded(other)
                        ),
                    }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::CoreError;

            fn try_from(s: String) -> std::result::Result<Self, Self::Error> {
                s.parse()
            }
        }
    };
}

/// At most the first 64 characters of `s`, marked when cut: error messages echo what a
/// client sent without growing with it.
pub fn bounded(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}… ({} bytes)", &s[..cut], s.len()),
        None => s.to_owned(),
    }
}

/// The first line of an error's message, without trailing space: what is recorded or
/// quoted of an error, since dependencies may append a backtrace or a multi-line dump.
pub fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default().trim_end()
}

#[cfg(test)]
mod tests {
    use crate::status::RunStatus;

    #[test]
    fn every_variant_parses_back_from_its_spelling() {
        for s in RunStatus::ALL {
            assert_eq!(s.as_str().parse::<RunStatus>().unwrap(), *s);
        }
    }

    #[test]
    fn an_unknown_spelling_names_the_type_and_is_bounded() {
        let long = "x".repeat(10_000);
        let err = long.parse::<RunStatus>().unwrap_err().to_string();
        assert!(err.contains("RunStatus"), "{err}");
        assert!(err.len() < 300, "{} bytes echoed", err.len());
    }
}
