//! Every `unsafe` in the repository, counted and checked: only in the
//! engine's kernels and its mmap (the guide allows kernels and FFI), every
//! block with a `// SAFETY` comment above it (within 12 lines: one comment
//! may cover a match's arms), every `unsafe fn` with a
//! `# Safety` section in its docs. The workspace denies `unsafe_code`, so
//! each use also carries an `allow` the compiler checks. The counts are
//! printed (`cargo nextest run -p trine-tests --test unsafe_audit
//! --no-capture`) and quoted in SECURITY.md.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// Where unsafe code may live, relative to the repository root.
const ALLOWED: &[&str] = &["node/engine/src/kernels/", "node/engine/src/mmap.rs"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | ".git" | "node_modules") && !name.starts_with('.') {
                rust_files(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The code of a line: without its string literals (text between double
/// quotes) and its comment.
fn code(line: &str) -> String {
    let unquoted: String = line.split('"').step_by(2).collect::<Vec<_>>().join(" ");
    match unquoted.find("//") {
        Some(i) => unquoted[..i].to_owned(),
        None => unquoted,
    }
}

#[derive(Default)]
struct Count {
    blocks: usize,
    fns: usize,
    impls: usize,
}

#[test]
fn every_unsafe_is_in_a_kernel_and_justified() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize()?;
    let mut files = Vec::new();
    rust_files(&root, &mut files)?;
    files.sort();
    let mut bad = Vec::new();
    let mut counts: Vec<(String, Count)> = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root)?.to_string_lossy().into_owned();
        let text = std::fs::read_to_string(file)?;
        let lines: Vec<&str> = text.lines().collect();
        let mut count = Count::default();
        for (i, line) in lines.iter().enumerate() {
            let c = code(line);
            let words: Vec<&str> = c
                .split(|ch: char| !(ch.is_alphanumeric() || ch == '_' || ch == '{'))
                .filter(|w| !w.is_empty())
                .collect();
            for (j, w) in words.iter().enumerate() {
                if *w != "unsafe" {
                    continue;
                }
                let next = words.get(j + 1).copied().unwrap_or("");
                let at = format!("{rel}:{}", i + 1);
                let before = &lines[i.saturating_sub(14)..i];
                if next.starts_with('{') || c.contains("unsafe {") {
                    count.blocks += 1;
                    // The comment may cover a group (a match's arms share one).
                    let near = &lines[i.saturating_sub(12)..=i];
                    if !near.iter().any(|l| l.contains("// SAFETY")) {
                        bad.push(format!(
                            "{at}: unsafe block without a `// SAFETY:` comment above it"
                        ));
                    }
                } else if next == "fn" {
                    count.fns += 1;
                    if !before.iter().any(|l| l.contains("# Safety")) {
                        bad.push(format!("{at}: unsafe fn without a `# Safety` doc section"));
                    }
                } else if next == "impl" {
                    count.impls += 1;
                    if !before.iter().any(|l| l.contains("SAFETY:")) {
                        bad.push(format!("{at}: unsafe impl without a `// SAFETY:` comment"));
                    }
                } else {
                    continue;
                }
                if !ALLOWED.iter().any(|a| rel.starts_with(a)) {
                    bad.push(format!(
                        "{at}: unsafe outside the kernels ({}); move it into one",
                        ALLOWED.join(", ")
                    ));
                }
            }
        }
        if count.blocks + count.fns + count.impls > 0 {
            counts.push((rel, count));
        }
    }
    println!("{:<44} {:>6} {:>4} {:>5}", "FILE", "BLOCKS", "FNS", "IMPLS");
    let (mut b, mut f, mut m) = (0, 0, 0);
    for (rel, c) in &counts {
        println!("{rel:<44} {:>6} {:>4} {:>5}", c.blocks, c.fns, c.impls);
        b += c.blocks;
        f += c.fns;
        m += c.impls;
    }
    println!("{:<44} {b:>6} {f:>4} {m:>5}", "total");
    // The audit sees the kernels' unsafe code at all (a broken walk or
    // pattern would pass everything).
    anyhow::ensure!(
        b > 0 && counts.iter().any(|(r, _)| r.ends_with("kernels/avx2.rs")),
        "the audit found no unsafe code in the kernels: the scan is broken"
    );
    anyhow::ensure!(
        bad.is_empty(),
        "unsafe code that breaks the rules:\n{}",
        bad.join("\n")
    );
    Ok(())
}
