//! Trine's gRPC contract, API version 1 (`trine.v1`).
//!
//! - [`v1`]: messages, `Inference`/`Admin` (client-facing) and `Raft`
//!   (peer-facing) clients and servers, generated at build time from
//!   `proto/trine/v1/*.proto` by protox + tonic-prost-build (no `protoc`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.
//!
//! No logic lives here beyond conversions; never edit generated code.

/// Generated code for package `trine.v1`.
#[allow(
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used
)]
pub mod v1 {
    tonic::include_proto!("trine.v1");
}

/// Encoded `FileDescriptorSet` of every `trine.v1` file and its imports, for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trine_v1_descriptor.bin"));

/// Fully qualified gRPC service names, as health checks and reflection use them.
pub mod service_names {
    pub const INFERENCE: &str = "trine.v1.Inference";
    pub const ADMIN: &str = "trine.v1.Admin";
    pub const RAFT: &str = "trine.v1.Raft";
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    use super::*;

    #[test]
    fn descriptor_set_decodes_and_names_every_service() {
        let fds = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
        let services: Vec<String> = fds
            .file
            .iter()
            .filter(|f| f.package() == "trine.v1")
            .flat_map(|f| f.service.iter().map(|s| format!("trine.v1.{}", s.name())))
            .collect();
        for name in [
            service_names::INFERENCE,
            service_names::ADMIN,
            service_names::RAFT,
        ] {
            assert!(
                services.iter().any(|s| s == name),
                "{name} missing from {services:?}"
            );
        }
        // Imports travel with the set, or reflection clients cannot resolve
        // google.protobuf.Duration.
        assert!(
            fds.file
                .iter()
                .any(|f| f.name() == "google/protobuf/duration.proto")
        );
    }

    /// common.proto's rule: 1000-1999 is reserved in every message, and no
    /// public field reaches it.
    #[test]
    fn every_message_reserves_the_internal_range() {
        let fds = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
        for file in fds.file.iter().filter(|f| f.package() == "trine.v1") {
            for msg in &file.message_type {
                // Descriptor ranges are half-open: [1000, 2000).
                assert!(
                    msg.reserved_range
                        .iter()
                        .any(|r| r.start() == 1000 && r.end() == 2000),
                    "{}: add `reserved 1000 to 1999;`",
                    msg.name()
                );
                for field in &msg.field {
                    assert!(
                        field.number() < 1000,
                        "{}.{} uses number {}, inside the internal range 1000-1999",
                        msg.name(),
                        field.name(),
                        field.number()
                    );
                }
            }
        }
    }

    #[test]
    fn every_request_and_response_carries_request_id_as_field_1() {
        let fds = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
        let mut checked = 0;
        for file in fds.file.iter().filter(|f| f.package() == "trine.v1") {
            for msg in &file.message_type {
                let name = msg.name();
                let is_rpc_message = name.ends_with("Request")
                    || name.ends_with("Response")
                    || name == "SnapshotChunk";
                if !is_rpc_message {
                    continue;
                }
                let first = msg.field.iter().find(|f| f.number() == 1);
                assert_eq!(
                    first.map(|f| f.name()),
                    Some("request_id"),
                    "{name}: field 1 must be request_id"
                );
                checked += 1;
            }
        }
        assert!(
            checked >= 20,
            "only {checked} request/response messages found"
        );
    }
}
