//! Generates the `cascade.v1` gRPC code with a vendored `protoc`, so building
//! needs nothing from the system package manager.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let config = || {
        let mut c = prost_build::Config::new();
        c.protoc_executable(&protoc);
        c
    };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let proto = ["../../proto/cascade/v1/cascade.proto"];
    // Messages and the server. Its codec answers a request that does not
    // decode with INVALID_ARGUMENT (the client's error), not prost's INTERNAL.
    tonic_prost_build::configure()
        .build_client(false)
        .codec_path("crate::codec::RequestCodec")
        .file_descriptor_set_path(out.join("cascade_descriptor.bin"))
        .compile_with_config(config(), &proto, &["../../proto"])?;
    // The client (gateway, bench, tests) keeps prost's codec: a response that
    // does not decode is a fault on the serving side. Its messages are the
    // ones above.
    let client = out.join("client");
    std::fs::create_dir_all(&client)?;
    tonic_prost_build::configure()
        .build_server(false)
        .extern_path(".cascade.v1", "crate::pb")
        .out_dir(&client)
        .compile_with_config(config(), &proto, &["../../proto"])?;
    println!("cargo:rerun-if-changed=../../proto/cascade/v1/cascade.proto");
    Ok(())
}
