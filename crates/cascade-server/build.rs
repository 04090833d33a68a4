//! Records the git commit for `cascade_build_info` (the gRPC code is
//! generated in `cascade-proto`).
fn main() {
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
}
