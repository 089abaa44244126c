//! Byte-level BPE (GPT-2 / LLaMA-3 / tiktoken style) from GGUF metadata
//! (`tokenizer.ggml.model = "gpt2"`: tokens + merges) or a Hugging Face
//! `tokenizer.json` (BITNET.md §5).
//!
//! Text is split with the LLaMA-3 pre-tokenizer regex (not the GPT-2
//! default, which bitnet.cpp falls back to), each piece's bytes are mapped to
//! GPT-2's printable characters, and ranked merges are applied lowest rank
//! first. Special tokens (`<|eot_id|>` …) are matched whole before splitting
//! when the caller allows them.

use std::collections::HashMap;

use fancy_regex::Regex;

use crate::gguf::{Header, Value};

/// LLaMA-3's pre-split pattern (BITNET.md §5).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Why a tokenizer cannot be built from a file's description of it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizerError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, TokenizerError> {
    Err(TokenizerError(m.into()))
}

/// GPT-2's byte → printable character map: printable Latin-1 bytes map to
/// themselves, the other 68 to U+0100 onwards in byte order.
pub fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    map
}

/// A loaded tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    /// (left, right) → (rank, merged).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens, longest first (for whole matching).
    special: Vec<(String, u32)>,
    is_special: Vec<bool>,
    byte_token: [u32; 256],
    byte_chars: [char; 256],
    char_byte: HashMap<char, u8>,
    pre: Regex,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Ids that end generation (eos, `<|eot_id|>`, `<|end_of_text|>` when present).
    pub stop: Vec<u32>,
    pub add_bos: bool,
}

impl Tokenizer {
    /// Over [`crate::vocab::synthetic`]`(size)`: all 256 bytes, merges and
    /// LLaMA-3's special tokens (BOS added). The tests' and fuzzers' vocabulary.
    pub fn synthetic(size: usize) -> Result<Self, TokenizerError> {
        let v = crate::vocab::synthetic(size);
        let specials: Vec<u32> = v
            .types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == crate::vocab::CONTROL)
            .map(|(i, _)| i as u32)
            .collect();
        Self::new(
            v.tokens,
            &v.merges,
            &specials,
            Some(v.bos),
            Some(v.eos),
            true,
        )
    }

    /// Builds from vocabulary, merges (as "left right") and the special ids.
    pub fn new(
        tokens: Vec<String>,
        merges: &[String],
        special_ids: &[u32],
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self, TokenizerError> {
        if tokens.is_empty() {
            return err("the vocabulary is empty");
        }
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let chars = byte_chars();
        let mut byte_token = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            match ids.get(&c.to_string()) {
                Some(&id) => byte_token[b] = id,
                None => {
                    return err(format!(
                        "byte {b:#04x} ({c:?}) has no token; this is not a byte-level BPE vocabulary"
                    ));
                }
            }
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let Some((l, r)) = m.split_once(' ') else {
                return err(format!("merge {rank} ({m:?}) is not \"left right\""));
            };
            let (Some(&li), Some(&ri), Some(&mi)) =
                (ids.get(l), ids.get(r), ids.get(&format!("{l}{r}")))
            else {
                return err(format!(
                    "merge {rank} ({m:?}) names a token missing from the vocabulary"
                ));
            };
            merge_map.entry((li, ri)).or_insert((rank as u32, mi));
        }
        let mut is_special = vec![false; tokens.len()];
        let mut special = Vec::new();
        for &id in special_ids {
            let Some(text) = tokens.get(id as usize) else {
                return err(format!(
                    "special token id {id} is outside the vocabulary of {}",
                    tokens.len()
                ));
            };
            is_special[id as usize] = true;
            if !text.is_empty() {
                special.push((text.clone(), id));
            }
        }
        special.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        for id in [bos, eos].into_iter().flatten() {
            if id as usize >= tokens.len() {
                return err(format!(
                    "special token id {id} is outside the vocabulary of {}",
                    tokens.len()
                ));
            }
        }
        let mut stop: Vec<u32> = eos.into_iter().collect();
        for name in ["<|eot_id|>", "<|end_of_text|>"] {
            if let Some(&id) = ids.get(name)
                && !stop.contains(&id)
            {
                stop.push(id);
            }
        }
        let pre = Regex::new(LLAMA3_PATTERN)
            .map_err(|e| TokenizerError(format!("pre-split pattern: {e}")))?;
        Ok(Self {
            char_byte: chars
                .iter()
                .enumerate()
                .map(|(b, &c)| (c, b as u8))
                .collect(),
            tokens,
            ids,
            merges: merge_map,
            special,
            is_special,
            byte_token,
            byte_chars: chars,
            pre,
            bos,
            eos,
            stop,
            add_bos,
        })
    }

    /// From GGUF metadata (`tokenizer.ggml.*`, model "gpt2").
    pub fn from_gguf(h: &Header) -> Result<Self, TokenizerError> {
        let model = h.get("tokenizer.ggml.model").and_then(Value::as_str);
        if model != Some("gpt2") {
            return err(format!(
                "tokenizer.ggml.model is {model:?}; Trine reads byte-level BPE (\"gpt2\", as BitNet b1.58 uses)"
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>, TokenizerError> {
            let Some(items) = h.get(key).and_then(Value::as_array) else {
                return err(format!("{key} is missing or not an array"));
            };
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| TokenizerError(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        // token_type 3 = control, 4 = user-defined: matched whole.
        let special: Vec<u32> = match h.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .enumerate()
                .filter(|(_, t)| matches!(t.as_u64(), Some(3 | 4)))
                .map(|(i, _)| i as u32)
                .collect(),
            None => Vec::new(),
        };
        let id = |key: &str| h.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let add_bos = h
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        Self::new(
            tokens,
            &merges,
            &special,
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            add_bos,
        )
    }

    /// From a Hugging Face `tokenizer.json` (a byte-level BPE model);
    /// `bos` and `eos` come from config.json (every eos id stops).
    pub fn from_hf_json(
        bytes: &[u8],
        bos: Option<u32>,
        eos: &[u32],
    ) -> Result<Self, TokenizerError> {
        #[derive(serde::Deserialize)]
        struct File {
            model: Bpe,
            #[serde(default)]
            added_tokens: Vec<Added>,
        }
        #[derive(serde::Deserialize)]
        struct Bpe {
            #[serde(rename = "type")]
            kind: Option<String>,
            vocab: HashMap<String, u32>,
            #[serde(default)]
            merges: Vec<serde_json::Value>,
        }
        #[derive(serde::Deserialize)]
        struct Added {
            id: u32,
            content: String,
            #[serde(default)]
            special: bool,
        }
        let file: File = serde_json::from_slice(bytes)
            .map_err(|e| TokenizerError(format!("tokenizer.json: {e}")))?;
        if file.model.kind.as_deref().is_some_and(|k| k != "BPE") {
            return err(format!(
                "tokenizer.json has a {:?} model; Trine reads byte-level BPE",
                file.model.kind
            ));
        }
        let total = file.model.vocab.len() + file.added_tokens.len();
        let mut tokens: Vec<Option<String>> = vec![None; total];
        let entries = file
            .model
            .vocab
            .into_iter()
            .chain(file.added_tokens.iter().map(|a| (a.content.clone(), a.id)));
        for (text, id) in entries {
            match tokens.get_mut(id as usize) {
                Some(slot @ None) => *slot = Some(text),
                Some(Some(_)) => {} // an added token repeating a vocabulary entry
                None => {
                    return err(format!(
                        "token id {id} is beyond the {total} tokens the file defines; ids must be 0..n without gaps"
                    ));
                }
            }
        }
        let defined = tokens.iter().take_while(|t| t.is_some()).count();
        if tokens[defined..].iter().any(Option::is_some) {
            return err(format!(
                "token id {defined} is missing; ids must be 0..n without gaps"
            ));
        }
        let tokens: Vec<String> = tokens.into_iter().flatten().collect();
        let merges: Vec<String> = file
            .model
            .merges
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(pair) => match (
                    pair.first().and_then(|v| v.as_str()),
                    pair.get(1).and_then(|v| v.as_str()),
                ) {
                    (Some(l), Some(r)) if pair.len() == 2 => Ok(format!("{l} {r}")),
                    _ => err(format!("merge {m} is not a pair of strings")),
                },
                other => err(format!("merge {other} is not a string or a pair")),
            })
            .collect::<Result<_, _>>()?;
        let special: Vec<u32> = file
            .added_tokens
            .iter()
            .filter(|a| a.special)
            .map(|a| a.id)
            .collect();
        let mut t = Self::new(tokens, &merges, &special, bos, eos.first().copied(), true)?;
        for &id in eos.iter().skip(1) {
            if (id as usize) < t.tokens.len() && !t.stop.contains(&id) {
                t.stop.push(id);
            }
        }
        Ok(t)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Token ids of `text`; special tokens written in the text are matched
    /// whole only when `special` is true (never for untrusted user text
    /// inside a chat turn). No BOS is added.
    pub fn encode(&self, text: &str, special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        // The earliest special token in the rest (the longest at one place).
        let next_special = |rest: &str| {
            self.special
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|&(at, len, _)| (at, usize::MAX - len))
        };
        while let Some((at, len, id)) = special.then(|| next_special(rest)).flatten() {
            self.encode_plain(&rest[..at], &mut out);
            out.push(id);
            rest = &rest[at + len..];
        }
        self.encode_plain(rest, &mut out);
        out
    }

    /// A plain-text prompt: BOS when the model wants one, then the text with
    /// no special tokens matched.
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = self.bos.filter(|_| self.add_bos).into_iter().collect();
        ids.extend(self.encode(text, false));
        ids
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let mut start = 0;
        // fancy_regex only fails on backtracking limits, which this pattern
        // cannot reach; a failure ends the matches and the tail is encoded whole.
        for m in self.pre.find_iter(text).flatten() {
            if m.start() > start {
                self.bpe(&text[start..m.start()], out);
            }
            self.bpe(m.as_str(), out);
            start = m.end();
        }
        if start < text.len() {
            self.bpe(&text[start..], out);
        }
    }

    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        // A piece that is itself a token is that token, merges or not
        // (tiktoken's rule; `ignore_merges` in LLaMA-3's tokenizer.json).
        let chars: String = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
        if let Some(&id) = self.ids.get(&chars) {
            out.push(id);
            return;
        }
        let mut symbols: Vec<u32> = piece.bytes().map(|b| self.byte_token[b as usize]).collect();
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, id)| (rank, i, id))
                })
                .min();
            let Some((_, i, id)) = best else { break };
            symbols[i] = id;
            symbols.remove(i + 1);
        }
        out.extend(symbols);
    }

    /// Bytes of one token (special tokens give their text). Unknown ids give nothing.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        if self.is_special[id as usize] {
            return t.as_bytes().to_vec();
        }
        t.chars()
            .map(|c| match self.char_byte.get(&c) {
                Some(&b) => vec![b],
                None => c.to_string().into_bytes(),
            })
            .collect::<Vec<_>>()
            .concat()
    }

    /// The text of `ids` (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// BitNet b1.58's chat format (BITNET.md §5): BOS, then per message
    /// "Role: " + trimmed content + `<|eot_id|>`, then "Assistant: ". Role
    /// prefixes are encoded apart from the content, as ChatFormat does; the
    /// content never matches special tokens.
    pub fn chat(&self, messages: &[(&str, &str)]) -> Result<Vec<u32>, TokenizerError> {
        let eot = self.id("<|eot_id|>").ok_or_else(|| {
            TokenizerError("this vocabulary has no <|eot_id|>, so it has no chat format".into())
        })?;
        let mut out: Vec<u32> = self.bos.into_iter().collect();
        for (role, content) in messages {
            let prefix = match *role {
                "system" => "System: ",
                "user" => "User: ",
                "assistant" => "Assistant: ",
                other => {
                    return err(format!(
                        "chat role {other:?} is not system, user or assistant"
                    ));
                }
            };
            out.extend(self.encode(prefix, false));
            out.extend(self.encode(content.trim(), false));
            out.push(eot);
        }
        out.extend(self.encode("Assistant: ", false));
        Ok(out)
    }
}

/// Decodes a token stream into text pieces, holding back bytes of a
/// character split across tokens until it is complete.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Text that became complete with `bytes`.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_some() => e.valid_up_to() + e.error_len().unwrap_or(1),
            Err(e) => e.valid_up_to(),
        };
        let done: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&done).into_owned()
    }

    /// Whatever is left at the end (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

#[cfg(test)]
mod tests;
