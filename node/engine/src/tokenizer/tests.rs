//! BPE mechanics on vocabularies built here. What is NOT tested here: the
//! reference ids of BITNET.md §5 ("The capital of France is" → 791, 6864,
//! …), which need the real 128,256-token LLaMA-3 vocabulary; no package on
//! the registries this project can reach ships it, and nothing is downloaded
//! at test time. Run `trine model eval` on the official file for that.

use proptest::prelude::*;

use super::*;

fn tiny() -> Tokenizer {
    Tokenizer::synthetic(512).unwrap()
}

fn pieces(text: &str) -> Vec<String> {
    let re = Regex::new(LLAMA3_PATTERN).unwrap();
    re.find_iter(text)
        .map(|m| m.unwrap().as_str().to_owned())
        .collect()
}

#[test]
fn gpt2_byte_map() {
    let m = byte_chars();
    assert_eq!(m[b' ' as usize], 'Ġ');
    assert_eq!(m[b'\n' as usize], 'Ċ');
    assert_eq!(m[b'a' as usize], 'a');
    let distinct: std::collections::HashSet<char> = m.iter().copied().collect();
    assert_eq!(distinct.len(), 256);
}

#[test]
fn llama3_pre_split() {
    assert_eq!(pieces("I'm 1234"), ["I", "'m", " ", "123", "4"]);
    assert_eq!(
        pieces("Hello world!!\n\nYes"),
        ["Hello", " world", "!!\n\n", "Yes"]
    );
    // Case-insensitive contractions and a trailing-space run kept apart.
    assert_eq!(pieces("WE'LL go  now"), ["WE", "'LL", " go", " ", " now"]);
}

#[test]
fn merges_apply_lowest_rank_first() {
    let mut tokens: Vec<String> = byte_chars().iter().map(char::to_string).collect();
    tokens.extend(["bc", "ab", "abc"].map(String::from));
    let merges: Vec<String> = ["b c", "a b"].map(String::from).to_vec();
    let t = Tokenizer::new(tokens, &merges, &[], None, None, false).unwrap();
    let (a, bc, abc) = (
        t.id("a").unwrap(),
        t.id("bc").unwrap(),
        t.id("abc").unwrap(),
    );
    // "b c" (rank 0) wins over "a b" (rank 1), and no merge joins a + bc.
    assert_eq!(t.encode("abcd", false), vec![a, bc, u32::from(b'd')]);
    // A piece that is a token is taken whole, whatever the merges say.
    assert_eq!(t.encode("abc", false), vec![abc]);
}

#[test]
fn special_tokens_only_when_allowed() {
    let t = tiny();
    let eot = t.id("<|eot_id|>").unwrap();
    let with = t.encode("hi<|eot_id|>", true);
    assert_eq!(with.last(), Some(&eot));
    let without = t.encode("hi<|eot_id|>", false);
    assert!(!without.contains(&eot));
    assert_eq!(t.decode(&without), "hi<|eot_id|>");
    assert!(t.stop.contains(&eot) && t.stop.contains(&t.eos.unwrap()));
}

#[test]
fn chat_format_matches_bitnet_md() {
    let t = tiny();
    let ids = t.chat(&[("system", "Be brief. "), ("user", "Hi")]).unwrap();
    let mut want = vec![t.bos.unwrap()];
    let eot = t.id("<|eot_id|>").unwrap();
    for part in [&["System: ", "Be brief."][..], &["User: ", "Hi"][..]] {
        want.extend(t.encode(part[0], false));
        want.extend(t.encode(part[1], false));
        want.push(eot);
    }
    want.extend(t.encode("Assistant: ", false));
    assert_eq!(ids, want);
    assert_eq!(
        t.decode(&ids),
        "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: "
    );
    assert!(t.chat(&[("robot", "x")]).is_err());
}

#[test]
fn learned_merges_compress_english() {
    let t = tiny();
    let text = "The capital of France is Paris.";
    let ids = t.encode(text, false);
    assert!(
        ids.len() * 2 < text.len(),
        "{} tokens for {} bytes",
        ids.len(),
        text.len()
    );
}

#[test]
fn stream_decoder_holds_split_characters() {
    let mut d = StreamDecoder::default();
    let bytes = "é€".as_bytes();
    assert_eq!(d.push(&bytes[..1]), "");
    assert_eq!(d.push(&bytes[1..3]), "é");
    assert_eq!(d.push(&bytes[3..]), "€");
    assert_eq!(d.push(&[0xE2]), "");
    assert_eq!(d.finish(), "\u{FFFD}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn decode_inverts_encode(text in "\\PC{0,40}") {
        let t = tiny();
        prop_assert_eq!(t.decode(&t.encode(&text, false)), text);
    }
}
