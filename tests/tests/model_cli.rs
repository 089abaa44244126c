//! `trine model synth` and `trine model inspect` through the binary: a
//! synthetic model is written, inspected clean, then corrupted and found out.

use std::time::Duration;

use anyhow::{Result, ensure};
use trine_tests::{error_lines, run, trine};

const T: Duration = Duration::from_secs(60);

fn trine_model(args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = trine();
    cmd.arg("model").args(args);
    run(cmd, T)
}

#[test]
fn synth_then_inspect_then_corrupt() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("tiny.gguf");
    let p = path.to_str().unwrap_or_default();
    let out = trine_model(&[
        "synth", "--preset", "tiny", "--format", "tq1_0", "--seed", "3", "--out", p,
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("layer 2/2"),
        "no progress shown"
    );

    let out = trine_model(&["inspect", p])?;
    let text = String::from_utf8(out.stdout)?;
    ensure!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "architecture: bitnet-b1.58",
        "bitnet-b1.58.embedding_length = 256",
        "tensors: 24 in",
        "blk.1.ffn_down.weight",
        "TQ1_0",
        "findings: none",
    ] {
        ensure!(text.contains(want), "{want:?} missing from:\n{text}");
    }

    // Same seed, same bytes; another seed, other bytes.
    let again = tmp.path().join("again.gguf");
    let a = again.to_str().unwrap_or_default();
    trine_model(&["synth", "--format", "tq1_0", "--seed", "3", "--out", a])?;
    ensure!(std::fs::read(&path)? == std::fs::read(&again)?);
    trine_model(&["synth", "--format", "tq1_0", "--seed", "4", "--out", a])?;
    ensure!(std::fs::read(&path)? != std::fs::read(&again)?);

    // A byte of an ffn_down block's scale changed: inspect names the tensor.
    let mut bytes = std::fs::read(&path)?;
    let n = bytes.len();
    bytes[n - 1] ^= 0x40;
    std::fs::write(&path, &bytes)?;
    let out = trine_model(&["inspect", p])?;
    ensure!(out.status.code() == Some(1), "{:?}", out.status);
    let text = String::from_utf8(out.stdout)?;
    ensure!(
        text.contains("blk.1.ffn_down.weight: TQ1_0 block"),
        "{text}"
    );
    let errors = error_lines(&out.stderr);
    ensure!(
        errors.len() == 1 && errors[0].contains("finding"),
        "{errors:?}"
    );

    // Truncated: one clear line, no panic.
    std::fs::write(&path, &bytes[..n / 3])?;
    let out = trine_model(&["inspect", p])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && !stderr.contains("panicked"),
        "{stderr}"
    );
    ensure!(
        stderr.contains("tiny.gguf") && stderr.contains("truncated"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn synth_into_a_missing_directory_says_so() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let target = tmp.path().join("no/such/dir/m.gguf");
    let out = trine_model(&["synth", "--out", target.to_str().unwrap_or_default()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "{stderr}");
    let errors = error_lines(&out.stderr);
    ensure!(
        errors.len() == 1 && errors[0].contains("no/such/dir"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn generate_streams_text_and_reports_speed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("tiny.gguf");
    let p = path.to_str().unwrap_or_default();
    let out = trine_model(&["synth", "--seed", "1", "--out", p])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generate = |extra: &[&str]| -> Result<(String, String)> {
        let mut cmd = trine();
        cmd.args(["generate", "--model", p, "-n", "12"]).args(extra);
        let out = run(cmd, T)?;
        let stderr = String::from_utf8(out.stderr)?;
        ensure!(out.status.success(), "{stderr}");
        Ok((String::from_utf8(out.stdout)?, stderr))
    };
    let (text, stderr) = generate(&["The capital of France is"])?;
    ensure!(!text.trim().is_empty(), "no text; stderr:\n{stderr}");
    let stats = stderr.lines().last().unwrap_or_default();
    ensure!(
        stats.contains("prefill") && stats.contains("tok/s") && stats.contains("kernel"),
        "{stderr}"
    );
    // Greedy is deterministic; sampling repeats with its seed.
    ensure!(generate(&["The capital of France is"])?.0 == text);
    ensure!(stats.contains("weights i2s"), "{stats}");
    // The 1.6-bit layout (and `auto`, whatever it keeps) gives the same
    // text: the same integer sums from other bytes.
    for layout in ["base3", "auto"] {
        let (same, stderr) = generate(&["--weight-layout", layout, "The capital of France is"])?;
        ensure!(
            same == text,
            "--weight-layout {layout}: {same:?} vs {text:?}"
        );
        let stats = stderr.lines().last().unwrap_or_default();
        ensure!(stats.contains("weights "), "{stderr}");
        if layout == "base3" {
            ensure!(stats.contains("weights base3"), "{stderr}");
        }
    }
    let mut cmd = trine();
    cmd.args(["generate", "--model", p, "--weight-layout", "2.5bit", "Hi"]);
    let out = run(cmd, T)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("base3"),
        "{stderr}"
    );
    // A prefetch distance that is not a byte count (or is absurd) is
    // refused up front, naming the variable; 0 (off) generates the same.
    for bad in ["2k", "99999999999"] {
        let mut cmd = trine();
        cmd.env("TRINE_PREFETCH_BYTES", bad)
            .args(["generate", "--model", p, "Hi"]);
        let out = run(cmd, T)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2) && stderr.contains("TRINE_PREFETCH_BYTES"),
            "{bad}: {stderr}"
        );
    }
    let mut cmd = trine();
    cmd.env("TRINE_PREFETCH_BYTES", "0").args([
        "generate",
        "--model",
        p,
        "-n",
        "12",
        "The capital of France is",
    ]);
    let out = run(cmd, T)?;
    ensure!(
        out.status.success() && String::from_utf8(out.stdout)? == text,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hot = ["--temperature", "1.5", "--seed", "4", "Hello"];
    ensure!(generate(&hot)?.0 == generate(&hot)?.0);
    generate(&["--chat", "--system", "Be brief.", "Hi"])?;

    let mut cmd = trine();
    cmd.args(["generate", "--model", p, "-n", "200", "Hello"]);
    let out = run(cmd, T)?;
    let errors = error_lines(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && errors.len() == 1 && errors[0].contains("context of 128"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn eval_and_perplexity_score_a_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("tiny.gguf");
    let p = path.to_str().unwrap_or_default();
    ensure!(
        trine_model(&["synth", "--seed", "2", "--out", p])?
            .status
            .success()
    );
    let dump = tmp.path().join("logits.f32");
    let mut cmd = trine();
    cmd.args([
        "model",
        "eval",
        "--model",
        p,
        "--tokens",
        "496,84,104,101,32",
        "--json",
        "--dump-logits",
    ])
    .arg(&dump);
    let out = run(cmd, T)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let positions = doc["positions"].as_array().cloned().unwrap_or_default();
    ensure!(positions.len() == 5, "{doc}");
    let logits: Vec<f32> = std::fs::read(&dump)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    ensure!(logits.len() == 5 * 512, "{} logits dumped", logits.len());
    for (i, pos) in positions.iter().enumerate() {
        let top = pos["top"].as_array().cloned().unwrap_or_default();
        ensure!(top.len() == 5);
        // The JSON's best token is the argmax of the dumped row.
        let row = &logits[i * 512..(i + 1) * 512];
        let best = (0..512).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        ensure!(top[0][0] == best, "position {i}: {top:?} vs argmax {best}");
    }
    let nll = doc["nll"].as_f64().unwrap_or(f64::NAN);
    ensure!(nll.is_finite() && nll > 0.0, "{doc}");

    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "The capital of France is Paris. Hello world! ".repeat(20),
    )?;
    let mut cmd = trine();
    cmd.args(["perplexity", "--model", p, "--ctx", "32", "--file"])
        .arg(&text);
    let out = run(cmd, T)?;
    let stdout = String::from_utf8(out.stdout)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ppl: f64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    // Random weights give confident, wrong logits: a large but finite perplexity.
    ensure!(ppl.is_finite() && ppl > 1.0, "{stdout}");
    ensure!(
        stdout.contains("over 120 tokens in 8 chunks of 32"),
        "{stdout}"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("[1/"),
        "no progress"
    );

    std::fs::write(&text, "too short")?;
    let mut cmd = trine();
    cmd.args(["perplexity", "--model", p, "--ctx", "32", "--file"])
        .arg(&text);
    let out = run(cmd, T)?;
    let errors = error_lines(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && errors.len() == 1 && errors[0].contains("2 × --ctx"),
        "{errors:?}"
    );
    Ok(())
}

#[test]
fn hugging_face_directories_work_like_gguf_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("tiny-hf");
    let gguf = tmp.path().join("tiny.gguf");
    let (d, g) = (
        dir.to_str().unwrap_or_default(),
        gguf.to_str().unwrap_or_default(),
    );
    ensure!(
        trine_model(&["synth", "--format", "hf", "--seed", "6", "--out", d])?
            .status
            .success()
    );
    ensure!(
        trine_model(&["synth", "--format", "tq2_0", "--seed", "6", "--out", g])?
            .status
            .success()
    );
    let out = trine_model(&["inspect", d])?;
    let text = String::from_utf8(out.stdout)?;
    ensure!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains("model.layers.1.mlp.down_proj.weight_scale")
            && text.contains("findings: none"),
        "{text}"
    );
    // The same synthetic model greedily says the same thing from either format.
    let say = |model: &str| -> Result<String> {
        let mut cmd = trine();
        cmd.args(["generate", "--model", model, "-n", "10", "Hello"]);
        let out = run(cmd, T)?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    ensure!(say(d)? == say(g)?);
    // A broken directory: inspect lists the finding and fails.
    std::fs::remove_file(dir.join("tokenizer.json"))?;
    let out = trine_model(&["inspect", d])?;
    ensure!(out.status.code() == Some(1));
    ensure!(String::from_utf8(out.stdout)?.contains("tokenizer.json"));
    Ok(())
}

/// `trine bench engine` through the binary on a tiny model: every section
/// of the report is there for each thread count and lm_head, the q8 head
/// reads fewer bytes per token than the file's F16 one, and its accuracy
/// comparison is filled in; `generate --quant-embd q8` runs and a bad value
/// names the choices.
#[test]
fn bench_engine_reports_kernels_bandwidth_shapes_decode_prefill_and_head_accuracy() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("tiny.gguf");
    let p = path.to_str().unwrap_or_default();
    ensure!(
        trine_model(&["synth", "--seed", "5", "--out", p])?
            .status
            .success()
    );
    let mut cmd = trine();
    cmd.args([
        "bench",
        "engine",
        "--model",
        p,
        "--threads",
        "1,2",
        "--reps",
        "1",
        "--tokens",
        "4",
        "--prompts",
        "16,64",
        "--bandwidth-mib",
        "64",
        "--accuracy-tokens",
        "40",
        "--json",
    ]);
    let out = run(cmd, Duration::from_secs(240))?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bw = r["bandwidth"].as_array().cloned().unwrap_or_default();
    ensure!(bw.len() == 2, "{r}");
    for b in &bw {
        ensure!(b["gb_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{b}");
    }
    // The kernels were chosen by measurement for each of tiny's four
    // ternary shapes (q/o 256×256, k/v 128×256, gate/up 512×256, down
    // 256×512) at each thread count, in both weight layouts (the default
    // i2s,base3), every SIMD kernel timed.
    ensure!(r["kernel"] == "measured", "{r}");
    let choice = r["kernel_choice"].as_array().cloned().unwrap_or_default();
    ensure!(choice.len() == 2 * 2 * 4, "{r}");
    for c in &choice {
        let timed = c["us_per_gemv"].as_array().cloned().unwrap_or_default();
        ensure!(!timed.is_empty(), "{c}");
        ensure!(timed[0][0] == c["kernel"], "the fastest is kept: {c}");
        ensure!(c["layout"] == c["weight_layout"], "{c}");
    }
    // Each shape row names the kernel that ran, plus one row per lm_head
    // kind.
    let shapes = r["shapes"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = shapes.iter().filter_map(|s| s["name"].as_str()).collect();
    ensure!(
        names.contains(&"lm_head F16")
            && names.contains(&"lm_head Q8_0")
            && names.contains(&"lm_head Q4_0"),
        "{names:?}"
    );
    for shape in ["q/o", "k/v", "gate/up", "down"] {
        ensure!(names.contains(&shape), "{names:?}");
    }
    ensure!(
        shapes.len() == 2 * 3 + 2 * 2 * 4,
        "three lm_head rows and four shapes in each layout per thread count: {names:?}"
    );
    let decode = r["decode"].as_array().cloned().unwrap_or_default();
    ensure!(
        decode.len() == 12,
        "file, q8 and q4 at 1 and 2 threads in both layouts: {r}"
    );
    let bytes = |weights: &str, head: &str| {
        decode
            .iter()
            .find(|d| d["weights"] == weights && d["lm_head"] == head)
            .and_then(|d| d["bytes_per_token"].as_u64())
            .unwrap_or(0)
    };
    ensure!(
        bytes("i2s", "Q8_0") > 0 && bytes("i2s", "Q8_0") < bytes("i2s", "F16"),
        "{r}"
    );
    ensure!(
        bytes("i2s", "Q4_0") > 0 && bytes("i2s", "Q4_0") < bytes("i2s", "Q8_0"),
        "{r}"
    );
    // Five trits a byte in 64-byte groups of 320 weights: tiny's 256- and
    // 512-wide rows fill one and two groups, the 64 and 128 bytes I2_S
    // takes, so tiny reads the same bytes in both layouts (2B4T's 2560-wide
    // rows take 512 bytes instead of 640; the engine's tests check that).
    for head in ["F16", "Q8_0", "Q4_0"] {
        ensure!(bytes("base3", head) == bytes("i2s", head), "{head}: {r}");
    }
    for d in &decode {
        ensure!(d["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{d}");
    }
    ensure!(r["prefill"].as_array().map(Vec::len) == Some(8), "{r}");
    let accuracy = r["accuracy"].as_array().cloned().unwrap_or_default();
    let heads: Vec<&str> = accuracy
        .iter()
        .filter_map(|a| a["lm_head"].as_str())
        .collect();
    ensure!(heads == ["Q8_0", "Q4_0"], "{r}");
    let error = |a: &serde_json::Value| a["max_abs_logit_error"].as_f64().unwrap_or(0.0);
    for acc in &accuracy {
        ensure!(acc["positions"] == 40, "{r}");
        let agreement = acc["argmax_agreement"].as_f64().unwrap_or(-1.0);
        ensure!((0.0..=1.0).contains(&agreement), "{acc}");
        ensure!(error(acc) > 0.0, "{acc}");
    }
    ensure!(
        error(&accuracy[1]) > error(&accuracy[0]),
        "four bits err more than eight: {r}"
    );

    for head in ["q8", "q4"] {
        let mut cmd = trine();
        cmd.args([
            "generate",
            "--model",
            p,
            "-n",
            "8",
            "--quant-embd",
            head,
            "Hello",
        ]);
        let out = run(cmd, T)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "{stderr}");
        // Without --kernel, generate measures the kernels per shape.
        ensure!(stderr.contains("kernel 256×512: "), "{stderr}");
    }
    let mut cmd = trine();
    cmd.args(["generate", "--model", p, "--quant-embd", "q3", "Hello"]);
    let out = run(cmd, T)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("q8"), "{stderr}");
    Ok(())
}
