//! Generates the `cascade.v1` gRPC code with a vendored `protoc`, so building
//! needs nothing from the system package manager.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("cascade_descriptor.bin"))
        .compile_protos(&["../../proto/cascade/v1/cascade.proto"], &["../../proto"])?;
    println!("cargo:rerun-if-changed=../../proto/cascade/v1/cascade.proto");
    // The commit for `cascade_build_info`; absent outside a git checkout.
    if let Ok(out) = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
    {
        let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !commit.is_empty() {
            println!("cargo:rustc-env=CASCADE_GIT_COMMIT={commit}");
        }
    }
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/refs/heads");
    Ok(())
}
