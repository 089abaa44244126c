//! A byte-level BPE vocabulary for synthetic models, laid out like
//! LLaMA-3's: the 256 byte tokens first, then merges learned from a small
//! built-in English text, then specials at the end (`<|begin_of_text|>`,
//! `<|end_of_text|>`, reserved, header ids, `<|eot_id|>` …) in LLaMA-3's
//! order, and unused filler tokens in between when the vocabulary is larger
//! than what the text yields.

use std::collections::HashMap;

use crate::tokenizer::byte_chars;

/// GGUF token types.
pub const NORMAL: i32 = 1;
pub const CONTROL: i32 = 3;
pub const UNUSED: i32 = 5;

const CORPUS: &str = "The capital of France is Paris. The capital of Italy is Rome. \
Hello world! Hello, how are you today? I am fine, thank you. \
The quick brown fox jumps over the lazy dog. A ternary model has weights of minus one, zero and one. \
Trine serves language models from a cluster of nodes in many regions. \
User: What is the capital of France? Assistant: The capital of France is Paris. \
System: You are a helpful assistant. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2025.\n\n";

/// Vocabulary, merges ("left right", by rank), token types, BOS and EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub types: Vec<i32>,
    pub bos: u32,
    pub eos: u32,
}

/// LLaMA-3's special token names for offset i from the first special.
fn special_name(i: usize) -> String {
    match i {
        0 => "<|begin_of_text|>".into(),
        1 => "<|end_of_text|>".into(),
        2..=5 => format!("<|reserved_special_token_{}|>", i - 2),
        6 => "<|start_header_id|>".into(),
        7 => "<|end_header_id|>".into(),
        8 => "<|reserved_special_token_4|>".into(),
        9 => "<|eot_id|>".into(),
        _ => format!("<|reserved_special_token_{}|>", i - 5),
    }
}

/// A vocabulary of exactly `size` tokens (at least 256 + 16).
pub fn synthetic(size: usize) -> Vocab {
    assert!(
        size >= 272,
        "a byte-level vocabulary needs at least 272 tokens"
    );
    let specials = if size >= 4096 { 256 } else { 16 };
    let chars = byte_chars();
    let mut tokens: Vec<String> = chars.iter().map(char::to_string).collect();
    let room = size - specials - 256;
    let merges = learn_merges(room, &chars);
    for m in &merges {
        tokens.push(m.replacen(' ', "", 1));
    }
    let mut types = vec![NORMAL; tokens.len()];
    let mut filler = 0;
    while tokens.len() < size - specials {
        tokens.push(format!("<|synthetic_unused_{filler}|>"));
        types.push(UNUSED);
        filler += 1;
    }
    let bos = tokens.len() as u32;
    for i in 0..specials {
        tokens.push(special_name(i));
        types.push(CONTROL);
    }
    Vocab {
        tokens,
        merges,
        types,
        bos,
        eos: bos + 1,
    }
}

/// Classic BPE training on [`CORPUS`], split into words at spaces (a space
/// starts a word, as GPT-2 pieces do): up to `n` merges, most frequent pair
/// first, ties broken by the pair's text so the result is deterministic.
fn learn_merges(n: usize, chars: &[char; 256]) -> Vec<String> {
    let mut words: HashMap<Vec<String>, usize> = HashMap::new();
    let mut start = 0;
    let bytes = CORPUS.as_bytes();
    for i in 1..=bytes.len() {
        if i == bytes.len() || bytes[i] == b' ' {
            let word: Vec<String> = bytes[start..i]
                .iter()
                .map(|&b| chars[b as usize].to_string())
                .collect();
            *words.entry(word).or_default() += 1;
            start = i;
        }
    }
    let mut merges = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while merges.len() < n {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for (w, c) in &words {
            for pair in w.windows(2) {
                *counts
                    .entry((pair[0].clone(), pair[1].clone()))
                    .or_default() += c;
            }
        }
        let best = counts
            .into_iter()
            .filter(|((l, r), _)| !seen.contains(&format!("{l}{r}")))
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
        let Some(((l, r), _)) = best else { break };
        let merged = format!("{l}{r}");
        seen.insert(merged.clone());
        merges.push(format!("{l} {r}"));
        words = words
            .into_iter()
            .map(|(w, c)| {
                let mut out: Vec<String> = Vec::with_capacity(w.len());
                for s in w {
                    if out.last() == Some(&l) && s == r {
                        out.pop();
                        out.push(merged.clone());
                    } else {
                        out.push(s);
                    }
                }
                (out, c)
            })
            .fold(HashMap::new(), |mut acc, (w, c)| {
                *acc.entry(w).or_default() += c;
                acc
            });
    }
    merges
}
