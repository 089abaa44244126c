//! The generation loop: prefill the prompt in one batch, then decode token
//! by token until a stop token or the token budget, with timings.

use std::time::{Duration, Instant};

use crate::model::{ForwardError, Input, Logits, Model, Output};
use crate::sampler::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (end of text, end of turn) was produced.
    Stop,
    /// The token budget ran out.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// Counts and timings of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prefill: Duration,
    pub decode: Duration,
    pub finish: Finish,
}

impl Stats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens after the first (the first comes with the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Runs `prompt` through a whole model and generates up to `max_tokens`,
/// calling `on_text(token, text)` for each token with the text it
/// completes (possibly empty mid-character); returning false stops.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(u32, &str) -> bool,
) -> Result<Stats, ForwardError> {
    let mut cache = model.new_cache(prompt.len() + max_tokens);
    let mut history = prompt.to_vec();
    let mut text = StreamDecoder::default();
    let started = Instant::now();
    let mut logits = match model.forward(Input::Tokens(prompt), &mut cache, Logits::Last)? {
        Output::Logits(l) => l,
        Output::Hidden(_) => {
            return Err(ForwardError::WrongInput {
                start: model.range.start,
                end: model.range.end,
                expected: "a whole model",
                given: "a stage",
            });
        }
    };
    let prefill = started.elapsed();
    let decode_start = Instant::now();
    let mut finish = Finish::Length;
    let mut generated = 0;
    while generated < max_tokens {
        let token = sampler.sample(&mut logits, &history);
        generated += 1;
        history.push(token);
        if tokenizer.stop.contains(&token) {
            finish = Finish::Stop;
            break;
        }
        let piece = text.push(&tokenizer.token_bytes(token));
        if !on_text(token, &piece) {
            finish = Finish::Cancelled;
            break;
        }
        if generated == max_tokens {
            break;
        }
        logits = match model.forward(Input::Tokens(&[token]), &mut cache, Logits::Last)? {
            Output::Logits(l) => l,
            Output::Hidden(_) => unreachable!("checked at prefill"),
        };
    }
    let rest = text.finish();
    if !rest.is_empty() {
        on_text(u32::MAX, &rest);
    }
    Ok(Stats {
        prompt_tokens: prompt.len(),
        generated,
        prefill,
        decode: decode_start.elapsed(),
        finish,
    })
}
