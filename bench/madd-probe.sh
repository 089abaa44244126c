#!/usr/bin/env bash
# What one core's integer multiply ports give, as a bound for the ternary
# GEMM (BENCHMARKS.md, "Prefill as a tiled GEMM"): the clock, from a chain
# of dependent scalar adds (one per cycle), and AVX2 `vpmaddubsw` per
# second over eight independent chains (throughput, not latency, bound).
#   bash bench/madd-probe.sh        (needs gcc: apt-get install gcc)
set -euo pipefail
command -v gcc >/dev/null || { echo "gcc not found: apt-get install gcc"; exit 1; }
grep -qw avx2 /proc/cpuinfo || { echo "this CPU has no AVX2: nothing to measure"; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/probe.c" <<'C'
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
  long n = 1000000000, x = 1;
  double t = now();
  for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  double ghz = n * 4 / (now() - t) / 1e9;
  __m256i a0 = _mm256_set1_epi8(1), a1 = _mm256_set1_epi8(2), a2 = _mm256_set1_epi8(3), a3 = _mm256_set1_epi8(4);
  __m256i a4 = _mm256_set1_epi8(5), a5 = _mm256_set1_epi8(6), a6 = _mm256_set1_epi8(7), a7 = _mm256_set1_epi8(9);
  __m256i b = _mm256_set1_epi8(1);
  n = 100000000;
  t = now();
  for (long i = 0; i < n; i++) {
    a0 = _mm256_maddubs_epi16(b, a0); a1 = _mm256_maddubs_epi16(b, a1); a2 = _mm256_maddubs_epi16(b, a2); a3 = _mm256_maddubs_epi16(b, a3);
    a4 = _mm256_maddubs_epi16(b, a4); a5 = _mm256_maddubs_epi16(b, a5); a6 = _mm256_maddubs_epi16(b, a6); a7 = _mm256_maddubs_epi16(b, a7);
  }
  double g = n * 8 / (now() - t) / 1e9;
  __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(a0, a1), _mm256_add_epi16(a2, a3)), _mm256_add_epi16(_mm256_add_epi16(a4, a5), _mm256_add_epi16(a6, a7)));
  printf("clock          %.2f GHz\n", ghz);
  printf("vpmaddubsw     %.2f G/s = %.2f per cycle = %.0f G multiply-adds/s (32 each)\n", g, g / ghz, g * 32);
  return _mm256_extract_epi16(s, 0) == 12345 && x == 0;
}
C
gcc -O2 -mavx2 -o "$dir/probe" "$dir/probe.c"
"$dir/probe"
