//! The forward pass of synthetic models written in every GGUF ternary type,
//! against an independent reference written plainly here in f64 (sharing no
//! code with the engine: only the weights), plus KV-cache and stage-split
//! equivalences and refusals of bad input.

#![allow(clippy::unwrap_used)] // test helpers: a failure is the test failing

use std::path::Path;

use half::f16;
use trine_engine::model::{ForwardError, Input, Logits, Model, Output};
use trine_engine::synth::{Preset, TernaryType, Weights};

const TOKENS: &[u32] = &[1, 7, 300, 42, 511, 0];

fn relu2(x: f64) -> f64 {
    x.max(0.0).powi(2)
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn max_diff(got: &[f32], want: &[Vec<f64>]) -> f64 {
    let vocab = want[0].len();
    let mut worst = 0f64;
    for (pos, row) in want.iter().enumerate() {
        for (v, &x) in row.iter().enumerate() {
            worst = worst.max((f64::from(got[pos * vocab + v]) - x).abs());
        }
    }
    worst
}

/// BITNET.md §1.3: s = 127/max(max|x|, 1e-5) and q = round_half_even(x·s),
/// in f32 as the definition states; returns q/s in f64.
fn fake_quant(x: &[f64]) -> Vec<f64> {
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let max = xf.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
    let s = 127.0 / max;
    xf.iter()
        .map(|&v| f64::from((v * s).round_ties_even().clamp(-128.0, 127.0)) / f64::from(s))
        .collect()
}

fn rms(x: &[f64], w: &[f32]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + 1e-5).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, &g)| v * inv * f64::from(g))
        .collect()
}

/// y_j = β Σ_i T_ji x_i over the trits, read back through the public getter.
fn linear(t: &trine_engine::ternary::Ternary, beta: f64, x: &[f64]) -> Vec<f64> {
    (0..t.rows())
        .map(|j| {
            beta * (0..t.cols())
                .map(|i| f64::from(t.get(j, i)) * x[i])
                .sum::<f64>()
        })
        .collect()
}

/// Logits at every position of `tokens`; `round_beta` applies the storage
/// precision of β (identity for I2_S, f16 for TQ).
fn reference(
    w: &Weights,
    tokens: &[u32],
    round_beta: fn(f32) -> f64,
    act: fn(f64) -> f64,
) -> Vec<Vec<f64>> {
    let c = &w.config;
    let hd = c.head_dim;
    let mut hs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            (0..c.hidden)
                .map(|i| f64::from(w.embedding[t as usize * c.hidden + i]))
                .collect()
        })
        .collect();
    for l in &w.layers {
        let bl = |t: &trine_engine::ternary::Ternary, x: &[f64]| linear(t, round_beta(t.beta()), x);
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, h) in hs.iter().enumerate() {
            let a = fake_quant(&rms(h, &l.attn_norm));
            let mut q = bl(&l.q, &a);
            let mut k = bl(&l.k, &a);
            for head in q.chunks_mut(hd).chain(k.chunks_mut(hd)) {
                // NEOX: pairs (i, i + d/2), angle pos·θ^(-2i/d).
                for i in 0..hd / 2 {
                    let ang = pos as f64 * 500_000f64.powf(-2.0 * i as f64 / hd as f64);
                    let (x0, x1) = (head[i], head[i + hd / 2]);
                    head[i] = x0 * ang.cos() - x1 * ang.sin();
                    head[i + hd / 2] = x0 * ang.sin() + x1 * ang.cos();
                }
            }
            qs.push(q);
            ks.push(k);
            vs.push(bl(&l.v, &a));
        }
        let group = c.heads / c.kv_heads;
        for (pos, h) in hs.iter_mut().enumerate() {
            let mut o = vec![0f64; c.heads * hd];
            for head in 0..c.heads {
                let kvh = head / group;
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for d in 0..hd {
                        o[head * hd + d] += p / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let attn = bl(&l.o, &fake_quant(&rms(&o, &l.attn_sub_norm)));
            for (x, d) in h.iter_mut().zip(attn) {
                *x += d;
            }
            let b = fake_quant(&rms(h, &l.ffn_norm));
            let gate = bl(&l.gate, &b);
            let up = bl(&l.up, &b);
            let m: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| act(*g) * u).collect();
            let down = bl(&l.down, &fake_quant(&rms(&m, &l.ffn_sub_norm)));
            for (x, d) in h.iter_mut().zip(down) {
                *x += d;
            }
        }
    }
    hs.iter()
        .map(|h| {
            let x = rms(h, &w.output_norm);
            (0..c.vocab)
                .map(|v| {
                    (0..c.hidden)
                        .map(|i| x[i] * f64::from(w.embedding[v * c.hidden + i]))
                        .sum()
                })
                .collect()
        })
        .collect()
}

fn write(w: &Weights, ty: TernaryType, dir: &Path) -> std::path::PathBuf {
    let path = dir.join(format!("tiny-{ty:?}.gguf"));
    w.to_gguf(ty).unwrap().write(&path).unwrap();
    path
}

fn logits(model: &Model, tokens: &[u32], which: Logits) -> Vec<f32> {
    let mut cache = model.new_cache(64);
    match model
        .forward(Input::Tokens(tokens), &mut cache, which)
        .unwrap()
    {
        Output::Logits(l) => l,
        Output::Hidden(_) => panic!("whole model returned hidden states"),
    }
}

#[test]
fn logits_match_an_independent_f64_reference_in_every_format() {
    let w = Weights::generate(Preset::Tiny, 7);
    let dir = tempfile::tempdir().unwrap();
    let exact: fn(f32) -> f64 = f64::from;
    let fp16: fn(f32) -> f64 = |b| f64::from(f16::from_f32(b).to_f32());
    for (ty, round) in [
        (TernaryType::I2S, exact),
        (TernaryType::TQ2_0, fp16),
        (TernaryType::TQ1_0, fp16),
    ] {
        let model = Model::open(&write(&w, ty, dir.path())).unwrap();
        let want = reference(&w, TOKENS, round, relu2);
        let got = logits(&model, TOKENS, Logits::All);
        let worst = max_diff(&got, &want);
        println!("{ty:?}: max |logit - reference| = {worst:.2e}");
        assert!(
            worst < 1e-3,
            "{ty:?}: logits differ from the reference by {worst}"
        );
        // The logits are not trivially small: the comparison means something.
        let spread = want[0].iter().cloned().fold(f64::MIN, f64::max)
            - want[0].iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread > 1.0, "degenerate logits ({spread})");
    }
}

#[test]
fn incremental_decode_equals_full_recompute() {
    let w = Weights::generate(Preset::Tiny, 11);
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(&write(&w, TernaryType::I2S, dir.path())).unwrap();
    let full = logits(&model, TOKENS, Logits::All);
    let mut cache = model.new_cache(64);
    let vocab = w.config.vocab;
    // Prefill two tokens, then one at a time.
    let Output::Logits(first) = model
        .forward(Input::Tokens(&TOKENS[..2]), &mut cache, Logits::All)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(first, full[..2 * vocab]);
    for (i, t) in TOKENS.iter().enumerate().skip(2) {
        let Output::Logits(step) = model
            .forward(Input::Tokens(&[*t]), &mut cache, Logits::Last)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(step, full[i * vocab..(i + 1) * vocab], "position {i}");
    }
    assert_eq!(cache.len(), TOKENS.len());
}

#[test]
fn a_split_model_equals_the_whole() {
    let w = Weights::generate(Preset::Tiny, 3);
    let dir = tempfile::tempdir().unwrap();
    let path = write(&w, TernaryType::TQ2_0, dir.path());
    let whole = Model::open(&path).unwrap();
    let first = Model::open_stage(&path, Some(0..1)).unwrap();
    let second = Model::open_stage(&path, Some(1..2)).unwrap();
    assert!(first.lm_head.is_none() && second.embedding.is_none());
    let (mut c1, mut c2) = (first.new_cache(16), second.new_cache(16));
    let Output::Hidden(h) = first
        .forward(Input::Tokens(TOKENS), &mut c1, Logits::All)
        .unwrap()
    else {
        panic!("first stage returned logits")
    };
    assert_eq!(h.len(), TOKENS.len() * w.config.hidden);
    let Output::Logits(split) = second
        .forward(Input::Hidden(&h), &mut c2, Logits::All)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(split, logits(&whole, TOKENS, Logits::All));
    // A stage refuses the other kind of input.
    assert!(matches!(
        second.forward(Input::Tokens(TOKENS), &mut c2, Logits::All),
        Err(ForwardError::WrongInput { .. })
    ));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let w = Weights::generate(Preset::Tiny, 5);
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(&write(&w, TernaryType::I2S, dir.path())).unwrap();
    let mut cache = model.new_cache(4);
    assert_eq!(
        model.forward(Input::Tokens(&[1, 512]), &mut cache, Logits::Last),
        Err(ForwardError::BadToken {
            id: 512,
            vocab: 512
        })
    );
    assert_eq!(cache.len(), 0);
    model
        .forward(Input::Tokens(&[1, 2, 3]), &mut cache, Logits::Last)
        .unwrap();
    assert!(matches!(
        model.forward(Input::Tokens(&[4, 5]), &mut cache, Logits::Last),
        Err(ForwardError::CacheFull {
            capacity: 4,
            used: 3,
            wanted: 2
        })
    ));
    assert_eq!(cache.len(), 3);
    assert_eq!(
        model.forward(Input::Tokens(&[]), &mut cache, Logits::Last),
        Err(ForwardError::Empty)
    );
}

/// Every format of one synthetic model (whose values every format stores
/// exactly) gives bit-identical logits: GGUF I2_S, TQ2_0, TQ1_0 and the
/// Hugging Face packed directory.
#[test]
fn every_format_gives_identical_logits() {
    let w = Weights::generate(Preset::Tiny, 21);
    let dir = tempfile::tempdir().unwrap();
    let i2s = Model::open(&write(&w, TernaryType::I2S, dir.path())).unwrap();
    // I2_S is Trine's own layout: weights and embedding stay in the mapped file.
    assert!(
        i2s.layers
            .iter()
            .all(|l| l.q.is_mapped() && l.down.is_mapped())
    );
    assert!(i2s.embedding.as_ref().is_some_and(|e| e.is_mapped()));
    let base = logits(&i2s, TOKENS, Logits::All);
    for ty in [TernaryType::TQ2_0, TernaryType::TQ1_0] {
        let other = logits(
            &Model::open(&write(&w, ty, dir.path())).unwrap(),
            TOKENS,
            Logits::All,
        );
        assert_eq!(other, base, "{ty:?}");
    }
    let hf = dir.path().join("hf");
    w.write_hf(&hf).unwrap();
    let (model, _) = trine_engine::open(&hf, None).unwrap();
    assert_eq!(
        logits(&model, TOKENS, Logits::All),
        base,
        "Hugging Face packed"
    );
}

/// Upstream llama.cpp's `bitnet` arch runs SiLU unless the file says
/// `bitnet.hidden_activation`; bitnet.cpp's archs run relu².
#[test]
fn upstream_bitnet_arch_uses_its_activation() {
    let mut w = Weights::generate(Preset::Tiny, 8);
    w.config.arch = "bitnet".into();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upstream.gguf");
    w.to_gguf(TernaryType::TQ2_0).unwrap().write(&path).unwrap();
    let model = Model::open(&path).unwrap();
    let got = logits(&model, TOKENS, Logits::All);
    let d = max_diff(&got, &reference(&w, TOKENS, f64::from, silu));
    assert!(d < 1e-3, "{d}");
    assert!(max_diff(&got, &reference(&w, TOKENS, f64::from, relu2)) > 1e-2);

    let mut gguf = w.to_gguf(TernaryType::TQ2_0).unwrap();
    gguf.kv(
        "bitnet.hidden_activation",
        trine_engine::gguf::Value::String("relu2".into()),
    );
    gguf.write(&path).unwrap();
    let got = logits(&Model::open(&path).unwrap(), TOKENS, Logits::All);
    assert!(max_diff(&got, &reference(&w, TOKENS, f64::from, relu2)) < 1e-3);
}

/// Nothing assumes the 2B4T or tiny shapes: a width that is not a multiple
/// of 128, 5 heads of 64 over 1 KV head, an ffn of 864, a vocabulary of 1000
/// (not a multiple of 64), loaded from a Hugging Face directory (whose packed
/// layout allows such widths) and checked against the f64 reference.
#[test]
fn odd_shapes_from_hugging_face_match_the_reference() {
    let config = trine_engine::model::Config {
        arch: "bitnet".into(),
        vocab: 1000,
        hidden: 320,
        ffn: 864,
        layers: 2,
        heads: 5,
        kv_heads: 1,
        head_dim: 64,
        rope_dim: 64,
        rope_theta: 500_000.0,
        eps: 1e-5,
        context: 64,
        activation: trine_engine::model::Activation::Relu2,
    };
    let w = Weights::generate_config(config, 13, &mut |_, _| {});
    let dir = tempfile::tempdir().unwrap();
    w.write_hf(dir.path()).unwrap();
    let (model, _) = trine_engine::open(dir.path(), None).unwrap();
    assert_eq!(model.config.hidden, 320);
    let tokens = [3, 999, 500, 42];
    let got = logits(&model, &tokens, Logits::All);
    let worst = max_diff(&got, &reference(&w, &tokens, f64::from, relu2));
    assert!(worst < 1e-3, "{worst}");
}

/// Continuous batching: sequences at different positions, prefilling and
/// decoding, run in one batched forward give bit-identical outputs and
/// caches to running each alone; a step that cannot run gets its own error
/// and leaves the others (and its cache) untouched. Checked on a whole
/// model and on a later stage (hidden-state input).
#[test]
fn a_batch_of_sequences_equals_each_alone() {
    use trine_engine::model::Step;
    let w = Weights::generate(Preset::Tiny, 8);
    let dir = tempfile::tempdir().unwrap();
    let path = write(&w, TernaryType::I2S, dir.path());
    let model = Model::open(&path).unwrap();
    // Three sequences with histories of 0, 3 and 5 tokens.
    let histories: [&[u32]; 3] = [&[], &[4, 9, 100], &[1, 2, 3, 4, 5]];
    let new: [&[u32]; 3] = [&[7, 8, 9, 10], &[11], &[12]];
    let which = [Logits::All, Logits::Last, Logits::Last];
    let mut alone = Vec::new();
    let mut batched_caches = Vec::new();
    for (hist, (tokens, &l)) in histories.iter().zip(new.iter().zip(&which)) {
        let mut c = model.new_cache(16);
        if !hist.is_empty() {
            model
                .forward(Input::Tokens(hist), &mut c, Logits::Last)
                .unwrap();
        }
        batched_caches.push(c.clone());
        alone.push((model.forward(Input::Tokens(tokens), &mut c, l).unwrap(), c));
    }
    // A fourth sequence whose step is bad (a token outside the vocabulary).
    let mut bad = model.new_cache(16);
    model
        .forward(Input::Tokens(&[3]), &mut bad, Logits::Last)
        .unwrap();
    let [c0, c1, c2] = &mut batched_caches[..] else {
        panic!()
    };
    let mut steps = vec![
        Step {
            input: Input::Tokens(new[0]),
            cache: c0,
            logits: which[0],
        },
        Step {
            input: Input::Tokens(&[1, 99_999]),
            cache: &mut bad,
            logits: Logits::Last,
        },
        Step {
            input: Input::Tokens(new[1]),
            cache: c1,
            logits: which[1],
        },
        Step {
            input: Input::Tokens(new[2]),
            cache: c2,
            logits: which[2],
        },
    ];
    let out = model.forward_batch(&mut steps);
    drop(steps);
    assert!(matches!(
        out[1],
        Err(ForwardError::BadToken { id: 99_999, .. })
    ));
    assert_eq!(bad.len(), 1, "the refused step's cache is unchanged");
    for (i, got) in [0, 2, 3].into_iter().map(|i| &out[i]).enumerate() {
        assert_eq!(got.as_ref().unwrap(), &alone[i].0, "sequence {i}'s output");
        assert_eq!(batched_caches[i].len(), alone[i].1.len());
    }
    // The caches hold the same keys and values: the next step agrees too.
    for (i, (_, c)) in alone.iter_mut().enumerate() {
        let a = model
            .forward(Input::Tokens(&[20]), c, Logits::Last)
            .unwrap();
        let b = model
            .forward(Input::Tokens(&[20]), &mut batched_caches[i], Logits::Last)
            .unwrap();
        assert_eq!(a, b, "sequence {i} after the batch");
    }

    // A later stage batches hidden states the same way.
    let first = Model::open_stage(&path, Some(0..1)).unwrap();
    let second = Model::open_stage(&path, Some(1..2)).unwrap();
    let hidden = |tokens: &[u32]| {
        let mut c = first.new_cache(16);
        match first
            .forward(Input::Tokens(tokens), &mut c, Logits::All)
            .unwrap()
        {
            Output::Hidden(h) => h,
            Output::Logits(_) => panic!("first stage returned logits"),
        }
    };
    let (ha, hb) = (hidden(&[5, 6, 7]), hidden(&[8]));
    let (mut a1, mut b1) = (second.new_cache(8), second.new_cache(8));
    let want_a = second
        .forward(Input::Hidden(&ha), &mut a1, Logits::Last)
        .unwrap();
    let want_b = second
        .forward(Input::Hidden(&hb), &mut b1, Logits::Last)
        .unwrap();
    let (mut a2, mut b2) = (second.new_cache(8), second.new_cache(8));
    let out = second.forward_batch(&mut [
        Step {
            input: Input::Hidden(&ha),
            cache: &mut a2,
            logits: Logits::Last,
        },
        Step {
            input: Input::Hidden(&hb),
            cache: &mut b2,
            logits: Logits::Last,
        },
    ]);
    assert_eq!(out, vec![Ok(want_a), Ok(want_b)]);
}

/// `--quant-embd q8`: the Q8_0 lm_head reads about half the bytes of the
/// F16 one, its logits stay within the quantization error of the F16
/// head's, the argmax agrees at every position here, and incremental
/// decode and batching still give the same bits as a full recompute.
#[test]
fn a_q8_lm_head_is_close_to_f16_and_consistent() {
    let (worst, rms, agree) = quantized_head(trine_engine::model::QuantEmbd::Q8, "Q8_0", 55);
    assert!(worst < 0.05 * rms, "logit error {worst} against rms {rms}");
    assert_eq!(agree, 1.0, "the q8 head changed a greedy choice");
}

/// `--quant-embd q4`: the same for the Q4_0 head, at about a quarter of
/// the F16 head's bytes and a larger (still bounded) logit error.
#[test]
fn a_q4_lm_head_is_close_to_f16_and_consistent() {
    let (worst, rms, agree) = quantized_head(trine_engine::model::QuantEmbd::Q4, "Q4_0", 30);
    assert!(worst < 0.35 * rms, "logit error {worst} against rms {rms}");
    assert!(agree >= 0.75, "greedy agreement {agree}");
}

/// Quantizes the tiny model's lm_head as `how`, checks its size (under
/// `pct` % of F16's), that only the head changed, and that incremental
/// decode equals the full recompute bit for bit; returns the worst logit
/// error, the logits' rms and the argmax agreement over [`TOKENS`].
#[allow(clippy::print_stdout)] // the measured error, for the log
fn quantized_head(how: trine_engine::model::QuantEmbd, ty: &str, pct: usize) -> (f64, f64, f64) {
    use trine_engine::sampler::argmax;
    let w = Weights::generate(Preset::Tiny, 21);
    let dir = tempfile::tempdir().unwrap();
    let f16_model = Model::open(&write(&w, TernaryType::I2S, dir.path())).unwrap();
    let mut q = f16_model.clone();
    q.set_lm_head(how);
    let head = q.lm_head.as_ref().unwrap();
    assert_eq!(head.type_name(), ty);
    let f16_head = f16_model.lm_head.as_ref().unwrap();
    assert_eq!(f16_head.type_name(), "F16");
    assert!(
        head.byte_len() * 100 < f16_head.byte_len() * pct,
        "{} vs {} bytes",
        head.byte_len(),
        f16_head.byte_len()
    );
    assert!(q.bytes_per_token() < f16_model.bytes_per_token());
    // The embedding lookup is untouched: only the head is quantized.
    assert_eq!(q.embedding.as_ref().unwrap().type_name(), "F16");

    let exact = logits(&f16_model, TOKENS, Logits::All);
    let approx = logits(&q, TOKENS, Logits::All);
    let vocab = w.config.vocab;
    let rms = (exact.iter().map(|v| f64::from(v * v)).sum::<f64>() / exact.len() as f64).sqrt();
    let worst = exact
        .iter()
        .zip(&approx)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0f64, f64::max);
    let positions = exact.len() / vocab;
    let agree = exact
        .chunks(vocab)
        .zip(approx.chunks(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count() as f64
        / positions as f64;
    println!(
        "{ty} head: max |Δlogit| = {worst:.4} (logit rms {rms:.3}), argmax agreement {agree:.3}"
    );
    assert!(worst > 0.0, "the {ty} head gave the F16 head's exact bits");

    // Incremental decode equals the full recompute, bit for bit.
    let mut cache = q.new_cache(64);
    q.forward(Input::Tokens(&TOKENS[..2]), &mut cache, Logits::Last)
        .unwrap();
    for (i, t) in TOKENS.iter().enumerate().skip(2) {
        let Output::Logits(step) = q
            .forward(Input::Tokens(&[*t]), &mut cache, Logits::Last)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(step, approx[i * vocab..(i + 1) * vocab], "position {i}");
    }
    (worst, rms, agree)
}

/// Kernels chosen per shape by measurement cover every weight shape of the
/// stage, and the logits are the same bits as with the scalar reference
/// everywhere (the choice changes speed only).
#[test]
fn kernels_chosen_by_measurement_give_the_reference_bits() {
    use trine_engine::kernels::Kernel;
    let w = Weights::generate(Preset::Tiny, 5);
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::open(&write(&w, TernaryType::I2S, dir.path())).unwrap();
    let mut reference = model.clone();
    reference.set_kernel(Kernel::Scalar);
    let chosen = model
        .choose(trine_engine::model::WeightLayout::I2s, None)
        .to_vec();
    for l in &model.layers {
        for m in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
            assert!(
                chosen
                    .iter()
                    .any(|c| (c.rows, c.cols) == (m.rows(), m.cols())),
                "shape {}×{} not measured: {chosen:?}",
                m.rows(),
                m.cols()
            );
        }
    }
    for c in &chosen {
        assert!(Kernel::available().contains(&c.kernel));
    }
    let q = &model.layers[0].q;
    let for_q = chosen
        .iter()
        .find(|c| (c.rows, c.cols) == (q.rows(), q.cols()))
        .unwrap();
    assert_eq!(model.kernel_for(q), for_q.kernel);
    assert_eq!(
        logits(&model, TOKENS, Logits::All),
        logits(&reference, TOKENS, Logits::All)
    );
    // --kernel replaces the measured choice.
    model.set_kernel(Kernel::Scalar);
    assert!(model.by_shape.is_empty());
    assert_eq!(model.kernel_for(&model.layers[0].down), Kernel::Scalar);
}

/// The base-3 layout (every shape, or `auto`'s per-shape choice) gives the
/// I2_S logits bit for bit, in a prompt (the batched GEMM) and in decode
/// (the GEMV); a measured model multiplies batches with the most capable
/// kernel's tiles, a forced kernel with its own.
#[test]
fn the_base3_layout_and_the_batch_kernel_change_no_bit() {
    use trine_engine::kernels::Kernel;
    use trine_engine::model::WeightLayout;
    use trine_engine::ternary::Layout;
    let w = Weights::generate(Preset::Tiny, 5);
    let dir = tempfile::tempdir().unwrap();
    let path = write(&w, TernaryType::I2S, dir.path());
    let want = logits(&Model::open(&path).unwrap(), TOKENS, Logits::All);
    for how in [WeightLayout::Base3, WeightLayout::Auto, WeightLayout::I2s] {
        let mut m = Model::open(&path).unwrap();
        let chosen = m.choose(how, None).len();
        assert_eq!(chosen, 4, "tiny's four shapes measured");
        assert_eq!(m.batch_kernel(), Kernel::best());
        if how == WeightLayout::Base3 {
            assert_eq!(m.layouts(), vec![Layout::Base3]);
            // Repacked into one arena (huge pages for the small matrices).
            assert!(m.layers.iter().all(|l| l.q.is_shared() && l.k.is_shared()));
        }
        assert_eq!(logits(&m, TOKENS, Logits::All), want, "{how}: prompt");
        let mut cache = m.new_cache(64);
        let mut last = Vec::new();
        for t in TOKENS {
            match m
                .forward(Input::Tokens(&[*t]), &mut cache, Logits::Last)
                .unwrap()
            {
                Output::Logits(l) => last = l,
                Output::Hidden(_) => panic!("whole model returned hidden states"),
            }
        }
        let vocab = w.config.vocab;
        assert_eq!(last, want[want.len() - vocab..], "{how}: decode");
    }
    let mut forced = Model::open(&path).unwrap();
    forced.choose(WeightLayout::Base3, Some(Kernel::Scalar));
    assert_eq!(forced.batch_kernel(), Kernel::Scalar);
    assert_eq!(forced.layouts(), vec![Layout::Base3]);
    assert_eq!(logits(&forced, TOKENS, Logits::All), want, "scalar base3");
}
