//! Pieces shared by the benchmarks.
#![allow(dead_code)] // each benchmark uses some of these

/// A child VMM that is killed when dropped, also when the benchmark panics.
pub struct Vmm(pub std::process::Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The median of `v` (the upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `STASIS_BENCH_RUNS`, default 3.
pub fn runs() -> usize {
    std::env::var("STASIS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}
