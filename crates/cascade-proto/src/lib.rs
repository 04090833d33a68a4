//! Cascade's gRPC API as Rust types: the `cascade.v1` messages, service
//! trait and client, the server's request codec, and (feature `core`) the
//! conversions between these messages and `cascade-core`'s types, all in
//! [`convert`]. Server, gateway client, load generator and tests share it.

pub mod codec;
#[cfg(feature = "core")]
pub mod convert;

pub mod pb {
    tonic::include_proto!("cascade.v1");
    mod client {
        include!(concat!(env!("OUT_DIR"), "/client/cascade.v1.rs"));
    }
    pub use client::cascade_client;
    /// Encoded descriptors for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cascade_descriptor");
}
