//! Bad input to `trine node`: each case exits non-zero with exactly one
//! error line naming the problem and the fix — no panic, no backtrace — and
//! leaves what was there untouched.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Result, ensure};
use trine_tests::{Node, command_for, error_lines, run, trine, trine_bin};

const T: Duration = Duration::from_secs(20);

/// `trine node` with free ports, a given data dir, and `extra` arguments.
fn node_cmd(data_dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = trine();
    cmd.arg("node")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(extra);
    cmd
}

/// Asserts a failed run with one error line containing every fragment.
fn assert_one_clear_error(out: &Output, code: i32, fragments: &[&str]) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(code),
        "exit {:?}, want {code}; stderr:\n{stderr}",
        out.status
    );
    ensure!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    let errors = error_lines(&out.stderr);
    ensure!(errors.len() == 1, "want one error line, got:\n{stderr}");
    ensure!(
        stderr.trim_end().lines().count() == 1,
        "want nothing but the error line, got:\n{stderr}"
    );
    for f in fragments {
        ensure!(errors[0].contains(f), "{f:?} missing from: {}", errors[0]);
    }
    Ok(())
}

fn config_file(dir: &Path, text: &str) -> Result<std::path::PathBuf> {
    let path = dir.join("trine.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn unknown_config_key() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = config_file(
        tmp.path(),
        "region = \"us-east\"\ngrpc_adress = \"127.0.0.1:1\"\n",
    )?;
    let mut cmd = node_cmd(&tmp.path().join("d"), &[]);
    cmd.arg("--config").arg(&cfg);
    let out = run(cmd, T)?;
    assert_one_clear_error(
        &out,
        78,
        &["trine.toml, line 2", "grpc_adress", "--print-config"],
    )?;
    ensure!(
        !tmp.path().join("d").exists(),
        "a config error must not create the data dir"
    );
    Ok(())
}

#[test]
fn wrong_type_in_config() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = config_file(tmp.path(), "# ports\ngrpc_addr = 7400\n")?;
    let mut cmd = node_cmd(&tmp.path().join("d"), &[]);
    cmd.arg("--config").arg(&cfg);
    let out = run(cmd, T)?;
    assert_one_clear_error(&out, 78, &["line 2", "invalid type"])
}

#[test]
fn missing_config_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut cmd = node_cmd(&tmp.path().join("d"), &[]);
    cmd.env("TRINE_CONFIG", tmp.path().join("nope.toml"));
    let out = run(cmd, T)?;
    assert_one_clear_error(&out, 78, &["nope.toml not found", "--print-config"])
}

#[test]
fn invalid_value_names_the_rule() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = run(node_cmd(&tmp.path().join("d"), &["--region", "US East"]), T)?;
    assert_one_clear_error(&out, 78, &["invalid region \"US East\"", "lowercase"])
}

#[test]
fn invalid_environment_value_is_refused_by_the_parser() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut cmd = node_cmd(&tmp.path().join("d"), &[]);
    cmd.env("TRINE_SHUTDOWN_TIMEOUT", "soon");
    let out = run(cmd, T)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // clap's usage error: exit 2, one error line plus its "--help" hint.
    ensure!(out.status.code() == Some(2), "{stderr}");
    let errors = error_lines(&out.stderr);
    ensure!(
        errors.len() == 1
            && errors[0].contains("'soon'")
            && errors[0].contains("--shutdown-timeout"),
        "{stderr}"
    );
    ensure!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

#[test]
fn port_already_in_use() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let mut cmd = trine();
    cmd.arg("node")
        .arg("--data-dir")
        .arg(tmp.path().join("d"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", &addr]);
    let out = run(cmd, T)?;
    assert_one_clear_error(
        &out,
        1,
        &[
            &format!("cannot listen for HTTP on {addr}"),
            "in use",
            "--http-addr",
        ],
    )
}

#[test]
fn unwritable_data_dir() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir()?;
    let locked_down = tmp.path().join("ro");
    std::fs::create_dir(&locked_down)?;
    std::fs::set_permissions(&locked_down, std::fs::Permissions::from_mode(0o555))?;
    // Both an existing read-only dir and one to be created beneath it.
    for dir in [locked_down.clone(), locked_down.join("sub")] {
        let out = run(unprivileged_node_cmd(&dir)?, T)?;
        assert_one_clear_error(
            &out,
            1,
            &[
                &format!("data dir {} is not writable", dir.display()),
                "--data-dir",
            ],
        )?;
    }
    ensure!(
        std::fs::read_dir(&locked_down)?.next().is_none(),
        "nothing may be written"
    );
    Ok(())
}

/// Root ignores file modes, so as root the node runs with the capabilities
/// that bypass them dropped (setpriv, util-linux): the permission check is
/// then as real as for any other user.
fn unprivileged_node_cmd(data_dir: &Path) -> Result<Command> {
    let args = [
        "node",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--data-dir",
    ];
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = command_for("setpriv");
        c.args([
            "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search",
            "--",
        ])
        .arg(trine_bin());
        c
    } else {
        trine()
    };
    cmd.args(args).arg(data_dir);
    Ok(cmd)
}

#[tokio::test]
async fn data_dir_locked_by_a_running_node() -> Result<()> {
    let node = Node::start(&[]).await?;
    let out = run(node_cmd(&node.data_dir, &[]), T)?;
    assert_one_clear_error(
        &out,
        1,
        &[
            "is locked by another running trine node",
            &format!("(pid {})", node.pid()),
            "--data-dir",
        ],
    )?;
    // The running node is unharmed.
    let (status, _) = trine_tests::http_get(&node.url("/readyz"))
        .await
        .unwrap_or_default();
    ensure!(
        status == 200,
        "first node not ready after the refused start"
    );
    Ok(())
}

#[test]
fn foreign_directory_is_not_taken_over() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::write(tmp.path().join("notes.txt"), "mine")?;
    let out = run(node_cmd(tmp.path(), &[]), T)?;
    assert_one_clear_error(&out, 1, &["not a trine data dir", "--data-dir"])?;
    let names: Vec<_> = std::fs::read_dir(tmp.path())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    ensure!(names == ["notes.txt"], "{names:?}");
    Ok(())
}

#[test]
fn print_config_shows_layers_in_order() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = config_file(
        tmp.path(),
        "region = \"from-file\"\nzone = \"file-zone\"\nname = \"file-name\"\n",
    )?;
    let print = |env: Option<&str>, flag: Option<&str>| -> Result<String> {
        let mut cmd = trine();
        cmd.args(["node", "--print-config", "--config"]).arg(&cfg);
        if let Some(v) = env {
            cmd.env("TRINE_REGION", v).env("TRINE_NAME", "env-name");
        }
        if let Some(v) = flag {
            cmd.args(["--region", v]);
        }
        let out = run(cmd, T)?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let file_only = print(None, None)?;
    ensure!(file_only.contains("region = \"from-file\""), "{file_only}");
    let with_env = print(Some("from-env"), None)?;
    ensure!(
        with_env.contains("region = \"from-env\"") && with_env.contains("name = \"env-name\""),
        "{with_env}"
    );
    ensure!(with_env.contains("zone = \"file-zone\""), "{with_env}");
    let with_flag = print(Some("from-env"), Some("from-flag"))?;
    ensure!(
        with_flag.contains("region = \"from-flag\"") && with_flag.contains("name = \"env-name\""),
        "{with_flag}"
    );

    // The printed config is itself a valid config file giving the same result.
    let elsewhere = tmp.path().join("printed");
    std::fs::create_dir(&elsewhere)?;
    let again = config_file(&elsewhere, &with_flag)?;
    let mut cmd = trine();
    cmd.args(["node", "--print-config", "--config"]).arg(&again);
    let out = run(cmd, T)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8(out.stdout)? == with_flag);
    Ok(())
}

/// `trine node trust-data-dir` works on a stopped node's data dir only: a
/// running node's is refused (its store is locked) and left as it was, a
/// directory without a Raft store is named as such.
#[tokio::test]
async fn trust_data_dir_refuses_a_running_node_and_a_foreign_dir() -> Result<()> {
    let raft = trine_tests::free_addr()?;
    let node = Node::start(&["--init", "--raft-addr", &raft]).await?;
    // A cluster of one confirms its start at once and votes.
    trine_tests::wait_for("the node to vote", T, || async {
        let text = node.metrics().await.ok()?;
        (trine_tests::metric(&text, "trine_raft_voting") == Some(1.0)).then_some(())
    })
    .await?;
    let mut cmd = trine();
    cmd.args(["node", "trust-data-dir", "--data-dir"])
        .arg(&node.data_dir);
    let out = run(cmd, T)?;
    assert_one_clear_error(&out, 1, &["cannot mark", "stop it first"])?;
    let tmp = tempfile::tempdir()?;
    let mut cmd = trine();
    cmd.args(["node", "trust-data-dir", "--data-dir"])
        .arg(tmp.path());
    let out = run(cmd, T)?;
    assert_one_clear_error(&out, 1, &["holds no Raft store"])?;
    let (status, _) = trine_tests::http_get(&node.url("/readyz"))
        .await
        .unwrap_or_default();
    ensure!(
        status == 200,
        "the node is not ready after the refused mark"
    );
    Ok(())
}
