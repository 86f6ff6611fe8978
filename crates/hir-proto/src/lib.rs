//! The gRPC contract of hindsight: `proto/hir/v1`.
//!
//! * [`pb`]: the generated messages, clients (`*_client`) and servers (`*_server`) of
//!   `GeneratorService`, `RelabelerService` and `TrainerService`.
//! * [`FILE_DESCRIPTOR_SET`], [`reflection_service`] and [`reflection_v1alpha_service`]:
//!   server reflection (`grpc.reflection.v1` and `v1alpha`), so that `grpcurl list` and
//!   other generic clients work against every hindsight server.
//! * [`health_service`]: the standard `grpc.health.v1` service.
//!
//! * [`convert`]: the one place where wire types and domain types meet.
//!
//! Protocol types stay at the edges: services convert them to domain types through
//! [`convert`] on the way in and out, and keep domain types everywhere else.
#![forbid(unsafe_code)]

pub mod codec;
pub mod convert;

/// Generated code for the `hir.v1` package.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("hir.v1");
}

/// The encoded `FileDescriptorSet` of `proto/hir/v1` and of every file it imports (`protoc
/// --include_imports`), served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hir_v1_descriptor");

/// The metadata key of a generator's FAILED_PRECONDITION reply to a request that names a
/// version other than the one serving: its value is the version serving, so that a client
/// can tell "not yet swapped" from other refusals and wait for the swap.
pub const SERVING_VERSION_KEY: &str = "hir-serving-version";

/// Fully qualified names of the three hindsight services.
pub const SERVICE_NAMES: [&str; 3] = [
    "hir.v1.GeneratorService",
    "hir.v1.RelabelerService",
    "hir.v1.TrainerService",
];

/// Services every hindsight server answers beside its own: health and reflection.
pub const COMMON_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Server reflection over the `hir.v1` contract, every file it imports (the well-known
/// types such as `google/protobuf/timestamp.proto`), health and reflection itself. Only
/// `services` are listed: a server lists what it answers, not every service of the
/// contract (the files of the others still resolve as imports).
fn reflection(services: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for name in services.iter().chain(&COMMON_SERVICES) {
        b = b.with_service_name(*name);
    }
    b
}

/// A `grpc.reflection.v1` service listing `services` (fully qualified names of the
/// `hir.v1` services the server answers) plus health and reflection.
pub fn reflection_service(
    services: &[&str],
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    reflection(services).build_v1()
}

/// The same as [`reflection_service`] under `grpc.reflection.v1alpha`, the version older
/// clients (grpcurl before 1.9, many GUI clients) still ask for.
pub fn reflection_v1alpha_service(
    services: &[&str],
) -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    reflection(services).build_v1alpha()
}

/// A `grpc.health.v1` service and the handle that sets its statuses. Every service starts
/// NOT_SERVING; a server marks itself SERVING once it can do its job.
pub fn health_service() -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn descriptor_set_is_valid_and_holds_every_service() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        for name in SERVICE_NAMES {
            assert!(
                services.iter().any(|s| s == name),
                "{name} missing from {services:?}"
            );
        }
    }

    #[test]
    fn descriptor_set_holds_every_file_it_imports() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
        assert!(
            names.contains(&"google/protobuf/timestamp.proto"),
            "{names:?}"
        );
        for file in &set.file {
            for import in &file.dependency {
                assert!(
                    names.contains(&import.as_str()),
                    "{} imports {import}, missing from {names:?}",
                    file.name()
                );
            }
        }
    }

    #[test]
    fn every_rpc_and_field_is_documented() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let mut undocumented = Vec::new();
        for file in set.file.iter().filter(|f| f.package() == "hir.v1") {
            let info = file
                .source_code_info
                .as_ref()
                .expect("descriptor set keeps source info");
            let documented = |path: &[i32]| {
                info.location.iter().any(|l| {
                    l.path == path
                        && l.leading_comments
                            .as_deref()
                            .is_some_and(|c| !c.trim().is_empty())
                })
            };
            // Descriptor paths: 6 = service, 2 = method; 4 = message, 2 = field.
            for (si, service) in file.service.iter().enumerate() {
                for (mi, method) in service.method.iter().enumerate() {
                    if !documented(&[6, si as i32, 2, mi as i32]) {
                        undocumented.push(format!("{}.{}", service.name(), method.name()));
                    }
                }
            }
            for (mi, message) in file.message_type.iter().enumerate() {
                for (fi, field) in message.field.iter().enumerate() {
                    if !documented(&[4, mi as i32, 2, fi as i32]) {
                        undocumented.push(format!("{}.{}", message.name(), field.name()));
                    }
                }
            }
        }
        assert!(
            undocumented.is_empty(),
            "undocumented rpcs and fields: {undocumented:?}"
        );
    }
}
