//! Scoring: negative log-likelihood of a token sequence, and perplexity over
//! a long text the way llama.cpp's `perplexity` tool computes it (chunks of
//! `ctx` tokens, each starting with BOS, scoring only the second half of
//! each chunk so every scored token has at least ctx/2 of context).

use crate::model::{ForwardError, Input, Logits, Model, Output};

/// log p(id) under softmax(logits), in f64.
pub fn log_prob(logits: &[f32], id: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let z: f64 = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .sum();
    f64::from(logits[id as usize]) - f64::from(max) - z.ln()
}

/// The `k` highest logits as (id, logit), best first (ties: lower id).
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = k.min(all.len());
    if k == 0 {
        return Vec::new();
    }
    all.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all
}

/// Logits at every position of `tokens` (positions × vocab).
pub fn all_logits(model: &Model, tokens: &[u32]) -> Result<Vec<f32>, ForwardError> {
    let mut cache = model.new_cache(tokens.len());
    match model.forward(Input::Tokens(tokens), &mut cache, Logits::All)? {
        Output::Logits(l) => Ok(l),
        Output::Hidden(_) => Err(ForwardError::WrongInput {
            start: model.range.start,
            end: model.range.end,
            expected: "a whole model",
            given: "a stage",
        }),
    }
}

/// Result of a perplexity run.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    pub chunks: usize,
    pub scored_tokens: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Mean of the squared per-token NLL, for the standard error.
    pub nll2: f64,
}

impl Perplexity {
    pub fn value(&self) -> f64 {
        self.nll.exp()
    }

    /// Standard error of the perplexity (llama.cpp's estimate: ppl × the
    /// standard error of the mean NLL).
    pub fn error(&self) -> f64 {
        let n = self.scored_tokens as f64;
        if n < 2.0 {
            return f64::NAN;
        }
        let var = (self.nll2 - self.nll * self.nll).max(0.0);
        self.value() * (var / (n - 1.0)).sqrt()
    }
}

/// Perplexity of `tokens` in chunks of `ctx`; `bos` replaces each chunk's
/// first token when given (as llama.cpp does). `progress(chunk, chunks,
/// running ppl)` after each chunk.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<Perplexity, ForwardError> {
    let chunks = if ctx >= 2 { tokens.len() / ctx } else { 0 };
    let vocab = model.config.vocab;
    let first = ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    for c in 0..chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let logits = all_logits(model, &chunk)?;
        for i in first..ctx - 1 {
            // Predicting the original token, not the BOS substitute.
            let next = tokens[c * ctx + i + 1];
            let x = -log_prob(&logits[i * vocab..(i + 1) * vocab], next);
            nll += x;
            nll2 += x * x;
            count += 1;
        }
        progress(c + 1, chunks, (nll / count.max(1) as f64).exp());
    }
    Ok(Perplexity {
        chunks,
        scored_tokens: count,
        nll: nll / count.max(1) as f64,
        nll2: nll2 / count.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_of_uniform_and_peaked() {
        let uniform = [0.5f32; 4];
        assert!((log_prob(&uniform, 2) - (0.25f64).ln()).abs() < 1e-12);
        let peaked = [0.0, 1000.0, 0.0];
        assert!(log_prob(&peaked, 1).abs() < 1e-12);
        assert!(log_prob(&peaked, 0) < -900.0);
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_id() {
        assert_eq!(
            top_k(&[1.0, 3.0, 3.0, 2.0], 3),
            vec![(1, 3.0), (2, 3.0), (3, 2.0)]
        );
        assert_eq!(top_k(&[1.0], 5), vec![(0, 1.0)]);
    }
}
