//! Stamps the build with its git revision and enabled backends, which
//! `pagoda --version` and the server's `/version` report.
use std::process::Command;

fn main() {
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PAGODA_GIT_REV={rev}");
    let backends = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() { "cpu-ref,cuda" } else { "cpu-ref" };
    println!("cargo:rustc-env=PAGODA_BACKENDS={backends}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
