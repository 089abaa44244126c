//! Run-time detection of the best SIMD level this CPU offers. Kernels pick
//! their implementation from it once; it is also reported in `--version`,
//! `trine_build_info{simd}` and the node's capacity.

use std::fmt;

/// SIMD levels the engine has (or will have) kernels for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    Neon,
    Avx2,
    /// AVX2 plus the VEX-encoded VNNI dot products (Alder Lake, Zen 5 client).
    AvxVnni,
    /// AVX-512 F + BW.
    Avx512,
    /// AVX-512 F + BW + VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl Level {
    /// The best level the running CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw");
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx512 && std::arch::is_x86_feature_detected!("avx512vnni") {
                return Self::Avx512Vnni;
            }
            if avx512 {
                return Self::Avx512;
            }
            if avx2 && std::arch::is_x86_feature_detected!("avxvnni") {
                return Self::AvxVnni;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Self::Neon;
        }
        Self::Scalar
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Neon => "neon",
            Self::Avx2 => "avx2",
            Self::AvxVnni => "avx-vnni",
            Self::Avx512 => "avx512",
            Self::Avx512Vnni => "avx512-vnni",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cross-checks detection against the kernel's own view of the CPU, an
    /// independent source, so a wrong feature name cannot pass unnoticed.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn matches_proc_cpuinfo() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .expect("flags line")
            .split_whitespace()
            .collect();
        let has = |f: &str| flags.contains(&f);
        let expected = if has("avx512f") && has("avx512bw") && has("avx512_vnni") {
            Level::Avx512Vnni
        } else if has("avx512f") && has("avx512bw") {
            Level::Avx512
        } else if has("avx2") && has("fma") && has("avx_vnni") {
            Level::AvxVnni
        } else if has("avx2") && has("fma") {
            Level::Avx2
        } else {
            Level::Scalar
        };
        assert_eq!(Level::detect(), expected);
    }

    #[test]
    fn names_are_distinct() {
        let all = [
            Level::Scalar,
            Level::Neon,
            Level::Avx2,
            Level::AvxVnni,
            Level::Avx512,
            Level::Avx512Vnni,
        ];
        let mut names: Vec<_> = all.iter().map(|l| l.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
    }
}
