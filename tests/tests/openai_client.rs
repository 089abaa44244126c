//! OpenAI's own Python client (`openai` from PyPI, pinned in
//! tests/py/setup.sh) works against a node unchanged: model list,
//! completions and chat completions, plain and streamed, and its error
//! classes for an unknown model and a bad parameter. The text is what
//! `trine generate` writes for the same file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use trine_tests::{Node, chain_note, cli_json, deploy, local_answer, run, synth_tiny, wait_for};

fn python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TRINE_CLIENTS_PYTHON") {
        return Ok(p.into());
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = here.join("../target/py-clients");
    let python = venv.join("bin/python");
    if !python.exists() {
        let status = Command::new("bash")
            .arg(here.join("py/setup.sh"))
            .arg(&venv)
            .status()
            .context("running tests/py/setup.sh")?;
        ensure!(
            status.success(),
            "could not install the openai package (see above); run `bash tests/py/setup.sh` by hand, or set TRINE_CLIENTS_PYTHON to a python with `openai` installed"
        );
    }
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works_unchanged() -> Result<()> {
    let python = python()?;
    let raft = trine_tests::free_addr()?;
    let node = Node::start(&["--init", "--raft-addr", &raft, "--allow-anonymous"]).await?;
    let grpc = node.endpoints.grpc.to_string();
    wait_for("a leader", Duration::from_secs(20), || async {
        chain_note(&grpc, "ready").ok()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let model = synth_tiny(dir.path())?;
    deploy(&grpc, &model, &["--name", "tiny"])?;
    wait_for("the model ready", Duration::from_secs(60), || {
        let grpc = grpc.clone();
        async move {
            cli_json::<serde_json::Value>(&["placement", "--node", &grpc, "-o", "json"])
                .ok()
                .filter(|s| s.len() == 1 && s[0]["state"] == "ready")
        }
    })
    .await?;
    let want = local_answer(&model)?;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/openai_check.py");
    let base = format!("http://{}/v1", node.endpoints.http);
    let out = tokio::task::spawn_blocking(move || {
        let mut c = Command::new(python);
        c.arg(script).arg(base).arg("tiny");
        run(c, Duration::from_secs(120))
    })
    .await??;
    ensure!(
        out.status.success(),
        "the openai client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(got["models"] == serde_json::json!(["tiny"]), "{got}");
    ensure!(got["completion"] == want.as_str(), "{got} != {want:?}");
    ensure!(got["completion_stream"] == want.as_str(), "{got}");
    ensure!(
        got["completion_finish"] == "length" && got["completion_stream_finish"] == "length",
        "{got}"
    );
    ensure!(
        got["completion_usage"] == serde_json::json!([2, 24, 26]),
        "{got}"
    );
    ensure!(got["chat_role"] == "assistant", "{got}");
    ensure!(
        got["chat"].as_str().is_some_and(|s| !s.is_empty()) && got["chat"] == got["chat_stream"],
        "{got}"
    );
    ensure!(
        got["unknown_model"]
            .as_str()
            .is_some_and(|s| s.starts_with("404") && s.contains("no-such-model")),
        "{got}"
    );
    ensure!(
        got["too_many_tokens"]
            .as_str()
            .is_some_and(|s| s.starts_with("400") && s.contains("max_tokens")),
        "{got}"
    );
    drop(node);
    Ok(())
}
