//! What this binary is: version, commit, and the SIMD level it detected.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_SHA: &str = env!("TRINE_GIT_SHA");

/// `trine --version` text: "0.1.0 (git 1a2b3c4d5e6f, simd avx512-vnni)".
pub fn long_version() -> String {
    format!(
        "{VERSION} (git {GIT_SHA}, simd {})",
        crate::simd::Level::detect()
    )
}
