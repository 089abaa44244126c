//! Choosing the ternary kernel per weight shape by measurement at load.
//!
//! Which SIMD kernel is fastest depends on the core (Zen 4 runs 512-bit
//! operations as two 256-bit halves, Intel server cores do not), on the
//! shape (long rows favour fewer, wider steps), and on the thread count
//! (at all cores the weights' read bandwidth, not the instructions, can
//! bound it): the order of [`Kernel::available`] is a guess. So a stage
//! times every SIMD kernel on its own matrices, in the pool it will run
//! in, and keeps the fastest per shape. Every kernel gives the same bits,
//! so the choice changes speed only.
//!
//! A measurement is one GEMV over the shape's matrices (up to
//! [`MEASURE_BYTES`], so the weights come from memory as in decode, not
//! from cache), repeated in rounds whose kernel order rotates; a kernel's
//! time is its median round.

use std::time::{Duration, Instant};

use super::{Activations, Kernel};
use crate::ternary::{Layout, Ternary};

/// Weight bytes one measurement reads per shape: above the last-level
/// caches of the machines we run on, below a second's work.
pub const MEASURE_BYTES: usize = 96 << 20;

/// Rounds per kernel (after one warm-up pass each, which also faults in
/// mapped weights).
pub const ROUNDS: usize = 5;

/// A shape's measurement: its kernel and weight layout, and the time per
/// GEMV of each candidate (fastest first).
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeChoice {
    pub rows: usize,
    pub cols: usize,
    pub kernel: Kernel,
    pub layout: Layout,
    pub timings: Vec<(Kernel, Layout, Duration)>,
}

impl ShapeChoice {
    /// The faster of two measurements of one shape (in two layouts): its
    /// choice, with both candidates' timings.
    pub fn merge(self, other: ShapeChoice) -> ShapeChoice {
        let mut timings = self.timings;
        timings.extend(other.timings);
        timings.sort_by_key(|&(_, _, t)| t);
        ShapeChoice {
            kernel: timings[0].0,
            layout: timings[0].1,
            timings,
            ..self
        }
    }
}

impl std::fmt::Display for ShapeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let both = self.timings.iter().any(|&(_, l, _)| l != self.layout);
        let name = |k: Kernel, l: Layout| {
            if both || l != Layout::I2s {
                format!("{} {}", k.name(), l.name())
            } else {
                k.name().to_owned()
            }
        };
        write!(
            f,
            "{}×{}: {}",
            self.rows,
            self.cols,
            name(self.kernel, self.layout)
        )?;
        let rest: Vec<String> = self
            .timings
            .iter()
            .map(|&(k, l, t)| format!("{} {:.0} µs", name(k, l), t.as_secs_f64() * 1e6))
            .collect();
        write!(f, " ({})", rest.join(", "))
    }
}

/// How many of `mats` one measurement reads: enough to read
/// [`MEASURE_BYTES`] a pass, at least one.
pub fn measured_count(mats: &[&Ternary]) -> usize {
    let mut used = 0;
    let mut bytes = 0;
    while used < mats.len() && (used == 0 || bytes < MEASURE_BYTES) {
        bytes += mats[used].data().len();
        used += 1;
    }
    used
}

/// The kernels worth measuring: every SIMD kernel this CPU runs (the
/// scalar reference only where there is none).
pub fn candidates() -> Vec<Kernel> {
    let all = Kernel::available();
    let simd: Vec<Kernel> = all
        .iter()
        .copied()
        .filter(|&k| k != Kernel::Scalar)
        .collect();
    if simd.is_empty() { all } else { simd }
}

/// Times each of `kernels` on `mats` (all of one shape) in the current
/// rayon pool and picks the fastest.
pub fn measure(mats: &[&Ternary], kernels: &[Kernel], rounds: usize) -> ShapeChoice {
    assert!(!mats.is_empty() && !kernels.is_empty() && rounds > 0);
    let (rows, cols, layout) = (mats[0].rows(), mats[0].cols(), mats[0].layout());
    let mats = &mats[..measured_count(mats)];
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let acts = Activations::quantize(&x);
    let mut out = vec![0f32; rows];
    let mut pass = |k: Kernel| {
        let start = Instant::now();
        for m in mats {
            k.gemv(m, &acts, &mut out);
        }
        std::hint::black_box(&out);
        start.elapsed() / mats.len() as u32
    };
    for &k in kernels {
        pass(k);
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); kernels.len()];
    for round in 0..rounds {
        for i in 0..kernels.len() {
            let i = (i + round) % kernels.len();
            times[i].push(pass(kernels[i]));
        }
    }
    let mut timings: Vec<(Kernel, Layout, Duration)> = kernels
        .iter()
        .zip(times)
        .map(|(&k, mut t)| {
            t.sort();
            (k, layout, t[t.len() / 2])
        })
        .collect();
    timings.sort_by_key(|&(_, _, t)| t);
    ShapeChoice {
        rows,
        cols,
        kernel: timings[0].0,
        layout,
        timings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_candidate_is_timed_and_the_fastest_is_kept() {
        let t = Ternary::from_trits(
            300,
            500,
            &(0..300 * 500)
                .map(|i| (i % 3) as i8 - 1)
                .collect::<Vec<_>>(),
            0.5,
        );
        let kernels = Kernel::available();
        let c = measure(&[&t, &t], &kernels, 3);
        assert_eq!((c.rows, c.cols), (300, 500));
        assert_eq!(c.timings.len(), kernels.len());
        for k in &kernels {
            assert!(c.timings.iter().any(|(j, _, _)| j == k), "{k:?} not timed");
        }
        assert!(c.timings.windows(2).all(|w| w[0].2 <= w[1].2), "{c}");
        assert_eq!(c.kernel, c.timings[0].0);
        assert_eq!(c.layout, Layout::I2s);
        assert!(c.to_string().starts_with("300×500: "), "{c}");
        // The same shape in the base-3 layout, merged: both layouts timed,
        // the fastest of all kept.
        let b = t.to_layout(Layout::Base3);
        let both = c.merge(measure(&[&b], &kernels, 3));
        assert_eq!(both.timings.len(), 2 * kernels.len());
        assert!(both.timings.windows(2).all(|w| w[0].2 <= w[1].2), "{both}");
        assert_eq!(
            (both.kernel, both.layout),
            (both.timings[0].0, both.timings[0].1)
        );
        assert!(both.to_string().contains(" base3 "), "{both}");
    }

    #[test]
    fn candidates_leave_out_the_reference_when_simd_exists() {
        let c = candidates();
        assert!(!c.is_empty());
        if Kernel::available().len() > 1 {
            assert!(!c.contains(&Kernel::Scalar), "{c:?}");
        }
    }
}
