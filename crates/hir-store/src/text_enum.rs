//! Enumerations stored as `TEXT` columns guarded by a `CHECK` constraint.
//!
//! [`text_enum!`] declares a Rust enum together with its database spelling,
//! so every status type converts the same way in both directions.

/// Declares an enum whose variants are stored as fixed strings.
///
/// The generated type gets `as_str`, `Display`, `FromStr` and
/// `TryFrom<String>` (used by `#[sqlx(try_from = "String")]` when decoding
/// rows). Parsing an unknown string yields [`crate::StoreError::Invalid`].
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

            /// The string stored in the database.
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
            type Err = $crate::StoreError;

            fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    other => Err($crate::StoreError::Invalid(format!(
                        "{} must be one of {:?}, got {:?}",
                        stringify!($name),
                        [$($text),+],
                        other
                    ))),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::StoreError;

            fn try_from(s: String) -> std::result::Result<Self, Self::Error> {
                s.parse()
            }
        }
    };
}

pub(crate) use text_enum;
