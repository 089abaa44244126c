//! Choosing the next token from logits: greedy, or temperature with top-k,
//! top-p and min-p, after a repetition penalty — in llama.cpp's order
//! (penalty → top-k → top-p → min-p → temperature → draw). Seeded: the same
//! seed, logits and history give the same tokens on any machine.

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

/// Sampling settings. The defaults are greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables: drop tokens below min_p × the top probability.
    pub min_p: f32,
    /// 1 disables; > 1 discourages tokens already in the history (CTRL's
    /// rule: positive logits divided, negative multiplied).
    pub repetition_penalty: f32,
    /// How many of the latest tokens the penalty looks at.
    pub penalty_window: usize,
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            penalty_window: 64,
            seed: 0,
        }
    }
}

/// A setting out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sampling: {0}")]
pub struct SettingsError(pub String);

impl Settings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |m: &str| Err(SettingsError(m.into()));
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return bad("temperature must be between 0 (greedy) and 100");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty must be positive (1 disables it)");
        }
        Ok(())
    }
}

/// A seeded sampler for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    settings: Settings,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(settings: Settings) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(settings.seed),
            settings,
        }
    }

    /// Skips the random draws of `tokens` earlier samples (one per token
    /// when sampling, none when greedy), so a sequence continued elsewhere
    /// draws what it would have drawn.
    pub fn advance(&mut self, tokens: usize) {
        if self.settings.temperature != 0.0 {
            for _ in 0..tokens {
                let _: f64 = self.rng.random();
            }
        }
    }

    /// The next token. `logits` are modified (penalized); `history` is
    /// the sequence so far. Non-finite logits are never chosen.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let s = self.settings;
        if s.repetition_penalty != 1.0 {
            let window = &history[history.len().saturating_sub(s.penalty_window)..];
            let mut seen = std::collections::HashSet::new();
            for &t in window {
                if let Some(l) = logits.get_mut(t as usize)
                    && seen.insert(t)
                {
                    *l = if *l > 0.0 {
                        *l / s.repetition_penalty
                    } else {
                        *l * s.repetition_penalty
                    };
                }
            }
        }
        if s.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates, best first (ties by id, for determinism).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cand.is_empty() {
            return 0;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if s.top_k > 0 {
            cand.truncate(s.top_k);
        }
        let probs = softmax(&cand, 1.0);
        if s.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= f64::from(s.top_p)
            });
            cand.truncate(keep.map_or(cand.len(), |k| k + 1));
        }
        if s.min_p > 0.0 {
            let floor = probs[0] * f64::from(s.min_p);
            let keep = probs
                .iter()
                .take(cand.len())
                .take_while(|&&p| p >= floor)
                .count();
            cand.truncate(keep.max(1));
        }
        let probs = softmax(&cand, s.temperature);
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (p, (id, _)) in probs.iter().zip(&cand) {
            acc += p;
            if r < acc {
                return *id;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest finite logit (the lowest id among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_finite() && l > best.1 {
            best = (i as u32, l);
        }
    }
    best.0
}

fn softmax(cand: &[(u32, f32)], temperature: f32) -> Vec<f64> {
    let max = f64::from(cand[0].1);
    let e: Vec<f64> = cand
        .iter()
        .map(|&(_, l)| ((f64::from(l) - max) / f64::from(temperature)).exp())
        .collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(settings: Settings, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(settings);
        (0..n)
            .map(|_| s.sample(&mut logits.to_vec(), &[]))
            .collect()
    }

    #[test]
    fn greedy_takes_the_max_and_skips_nan() {
        assert_eq!(argmax(&[0.1, f32::NAN, 3.0, 3.0, -1.0]), 2);
        let mut s = Sampler::new(Settings::default());
        assert_eq!(s.sample(&mut [1.0, 5.0, 2.0], &[]), 1);
    }

    #[test]
    fn seeded_draws_repeat_and_differ_by_seed() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Settings {
            temperature: 1.0,
            seed: 9,
            ..Settings::default()
        };
        assert_eq!(draw(s, &logits, 40), draw(s, &logits, 40));
        assert_ne!(
            draw(s, &logits, 40),
            draw(Settings { seed: 10, ..s }, &logits, 40)
        );
    }

    #[test]
    fn top_k_top_p_min_p_limit_the_candidates() {
        let logits = [0.0, 1.0, 2.0, 3.0, 4.0];
        let hot = Settings {
            temperature: 5.0,
            seed: 1,
            ..Settings::default()
        };
        let only = |s: Settings| {
            let mut v = draw(s, &logits, 300);
            v.sort_unstable();
            v.dedup();
            v
        };
        assert_eq!(only(hot).len(), 5);
        assert_eq!(only(Settings { top_k: 2, ..hot }), vec![3, 4]);
        // p = softmax: 0.636, 0.234, 0.086 …; top_p 0.8 keeps two.
        assert_eq!(only(Settings { top_p: 0.8, ..hot }), vec![3, 4]);
        // min_p 0.3 of 0.636 = 0.19: keeps 4 and 3.
        assert_eq!(only(Settings { min_p: 0.3, ..hot }), vec![3, 4]);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(Settings {
            repetition_penalty: 3.0,
            ..Settings::default()
        });
        assert_eq!(s.sample(&mut [2.0, 1.0, -1.0], &[0]), 1);
        let mut logits = [2.0, 1.0, -1.0];
        s.sample(&mut logits, &[0, 2, 0]);
        assert_eq!(logits, [2.0 / 3.0, 1.0, -3.0]);
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(
            Settings {
                temperature: -1.0,
                ..Settings::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Settings {
                top_p: 0.0,
                ..Settings::default()
            }
            .validate()
            .is_err()
        );
        assert!(Settings::default().validate().is_ok());
    }
}
