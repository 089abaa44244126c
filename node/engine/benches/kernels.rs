//! Criterion benchmarks of the engine's kernels, one GEMV (or lm_head row
//! block) at a time, with the weights in cache: what each kernel's
//! instructions cost, apart from memory. `trine bench engine` measures the
//! same kernels from memory, against this machine's bandwidth, on a whole
//! model.
//!
//! `cargo bench -p trine-engine --bench kernels` (add a filter, e.g.
//! `-- ternary/2560x6912`, to run a part).

#![allow(clippy::unwrap_used)] // a benchmark: a failure to start is a panic

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use trine_engine::kernels::q4::{self, Q4Acts};
use trine_engine::kernels::q8::{self, Q8Acts};
use trine_engine::kernels::{Activations, Kernel, amx, choose};
use trine_engine::ternary::{Layout, Ternary};

/// Deterministic values in about [-2, 2].
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + seed * 101) % 257) as f32 - 128.0) / 64.0)
        .collect()
}

/// A deterministic ternary matrix.
fn weights(rows: usize, cols: usize) -> Ternary {
    let trits: Vec<i8> = (0..rows * cols).map(|i| ((i * 7) % 3) as i8 - 1).collect();
    Ternary::from_trits(rows, cols, &trits, 0.5)
}

fn one_thread() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
}

/// Each kernel this CPU runs on the 2B4T ternary shapes, one thread, in
/// both layouts (ids `KERNEL` for I2_S, `KERNEL-base3` for the 1.6-bit
/// layout; the throughput is each layout's own bytes).
fn ternary(c: &mut Criterion) {
    let mut g = c.benchmark_group("ternary");
    for (rows, cols) in [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)] {
        let i2s = weights(rows, cols);
        let base3 = i2s.to_layout(Layout::Base3);
        let acts = Activations::quantize(&values(cols, 1));
        let mut out = vec![0f32; rows];
        let pool = one_thread();
        for k in choose::candidates() {
            for w in [&i2s, &base3] {
                g.throughput(Throughput::Bytes(w.data().len() as u64));
                let id = match w.layout() {
                    Layout::I2s => k.name().to_owned(),
                    Layout::Base3 => format!("{}-base3", k.name()),
                };
                g.bench_with_input(
                    BenchmarkId::new(format!("{rows}x{cols}"), id),
                    &k,
                    |b, &k| b.iter(|| pool.install(|| k.gemv(w, &acts, &mut out))),
                );
            }
        }
    }
    g.finish();
}

/// 1,024 lm_head rows of 2,560 values against one token, Q8_0 and Q4_0.
fn lm_head(c: &mut Criterion) {
    let (rows, cols) = (1024, 2560);
    let x = values(cols, 2);
    let mut g = c.benchmark_group("lm_head");

    let len8 = q8::row_bytes(cols);
    let mut w8 = vec![0u8; rows * len8];
    for (r, row) in w8.chunks_exact_mut(len8).enumerate() {
        q8::quantize_row(&values(cols, r + 3), row);
    }
    let a8 = Q8Acts::quantize(&x);
    g.throughput(Throughput::Bytes(w8.len() as u64));
    g.bench_function("q8_0/row", |b| {
        b.iter(|| {
            for row in w8.chunks_exact(len8) {
                black_box(q8::dot_n(row, [&a8]));
            }
        })
    });

    let len4 = q4::row_bytes(cols);
    let mut w4 = vec![0u8; rows * len4];
    for (r, row) in w4.chunks_exact_mut(len4).enumerate() {
        q4::quantize_row(&values(cols, r + 3), row);
    }
    let a4 = Q4Acts::quantize(&x);
    g.throughput(Throughput::Bytes(w4.len() as u64));
    g.bench_function("q4_0/row", |b| {
        b.iter(|| {
            for row in w4.chunks_exact(len4) {
                black_box(q4::dot_n(row, [&a4]));
            }
        })
    });
    g.finish();
}

/// Prefill's GEMM: each 2B4T ternary shape times a 128-token batch, one
/// thread, each kernel; throughput in multiply-adds (weights × tokens).
fn ternary_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("ternary_gemm");
    let n = 128;
    for (rows, cols) in [(2560, 2560), (6912, 2560), (2560, 6912)] {
        let w = weights(rows, cols);
        let acts: Vec<Activations> = (0..n)
            .map(|t| Activations::quantize(&values(cols, t + 1)))
            .collect();
        let mut out = vec![0f32; rows * n];
        g.throughput(Throughput::Elements((rows * cols * n) as u64));
        let pool = one_thread();
        // Each kernel's register tiles, then (where the CPU has them) the
        // AMX tiles, which any SIMD kernel uses for batches.
        amx::set_enabled(false);
        for k in choose::candidates() {
            g.bench_with_input(
                BenchmarkId::new(format!("{rows}x{cols}x{n}"), k.name()),
                &k,
                |b, &k| b.iter(|| pool.install(|| k.gemm(&w, &acts, &mut out))),
            );
        }
        amx::set_enabled(true);
        if amx::usable() {
            let k = Kernel::best();
            g.bench_with_input(
                BenchmarkId::new(format!("{rows}x{cols}x{n}"), "amx"),
                &k,
                |b, &k| b.iter(|| pool.install(|| k.gemm(&w, &acts, &mut out))),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, ternary, ternary_gemm, lm_head);
criterion_main!(benches);
