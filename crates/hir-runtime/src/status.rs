//! Errors to gRPC statuses, the same way in every service. A service's error enum says
//! what class of failure it is ([`ErrorClass`]) and what a client may read; this module
//! picks the code and keeps what a client reads short. Our own faults go out as INTERNAL
//! with an opaque message and a reference; the details go to the log under that reference.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};

use hir_core::ErrorClass;

/// The longest message a client receives; longer ones are cut, marked, and their length
/// given, so that an echo of a huge input never makes a reply unreadable.
pub const MAX_MESSAGE: usize = 1024;

/// The status for an error of class `class`: `public` is what the client may read,
/// `detail` the whole error, logged when the fault is ours.
pub fn to_status(class: ErrorClass, public: impl Display, detail: &dyn Display) -> tonic::Status {
    let message = bounded(&public.to_string());
    match class {
        ErrorClass::InvalidInput => tonic::Status::invalid_argument(message),
        ErrorClass::NotFound => tonic::Status::not_found(message),
        ErrorClass::Conflict => tonic::Status::already_exists(message),
        ErrorClass::FailedPrecondition => tonic::Status::failed_precondition(message),
        ErrorClass::Unavailable => {
            tracing::warn!(error = %detail, "unavailable");
            tonic::Status::unavailable(message)
        }
        ErrorClass::ResourceExhausted => tonic::Status::resource_exhausted(message),
        ErrorClass::Internal => {
            static NEXT: AtomicU64 = AtomicU64::new(1);
            let reference = format!(
                "{:x}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            tracing::error!(error = %detail, reference, "internal error");
            tonic::Status::internal(format!(
                "internal error (reference {reference}); the service's log has the details"
            ))
        }
    }
}

/// `s` cut to at most [`MAX_MESSAGE`] bytes on a character boundary, marked when cut.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_owned();
    }
    let mut cut = MAX_MESSAGE;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..cut], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_class_has_its_code_and_internal_faults_stay_opaque() {
        let cases = [
            (ErrorClass::InvalidInput, tonic::Code::InvalidArgument),
            (ErrorClass::NotFound, tonic::Code::NotFound),
            (ErrorClass::Conflict, tonic::Code::AlreadyExists),
            (
                ErrorClass::FailedPrecondition,
                tonic::Code::FailedPrecondition,
            ),
            (ErrorClass::Unavailable, tonic::Code::Unavailable),
            (
                ErrorClass::ResourceExhausted,
                tonic::Code::ResourceExhausted,
            ),
            (ErrorClass::Internal, tonic::Code::Internal),
        ];
        for (class, code) in cases {
            assert_eq!(to_status(class, "m", &"d").code(), code);
        }
        let s = to_status(
            ErrorClass::Internal,
            "secret /etc/passwd",
            &"secret /etc/passwd",
        );
        assert!(!s.message().contains("secret"), "{}", s.message());
        assert!(s.message().contains("reference"), "{}", s.message());
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let s = to_status(ErrorClass::InvalidInput, "é".repeat(20_000), &"");
        assert!(
            s.message().len() < MAX_MESSAGE + 64,
            "{}",
            s.message().len()
        );
        assert!(
            s.message().ends_with("(40000 bytes in all)"),
            "{}",
            s.message()
        );
    }
}
