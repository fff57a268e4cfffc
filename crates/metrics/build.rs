//! Records the git commit for `sirocco_build_info`, when built from a checkout.

fn main() {
    let hash = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SIROCCO_GIT_HASH={hash}");
    println!("cargo:rerun-if-changed=../../.git/HEAD");
}
