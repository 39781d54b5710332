//! Generated `pmkvq.v1` types and services (from `proto/pmkvq/v1/`, compiled at build time).
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("pmkvq.v1");

/// Encoded `FileDescriptorSet` of `pmkvq.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pmkvq_v1_descriptor.bin"));
