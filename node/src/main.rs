//! `trine`: parse the command line, run the subcommand, turn any failure into
//! one line on stderr and an exit status.

use std::process::ExitCode;
use std::time::Duration;

use trine_node::cli::{self, Command, NodeArgs};
use trine_node::{logging, node, shutdown};

/// jemalloc, as TiKV and CockroachDB use: with glibc's malloc, the
/// threads' arenas kept freed memory and a node's RSS rose to several times
/// its live heap over a soak (BENCHMARKS.md); jemalloc returns idle pages
/// to the system.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// sysexits' EX_CONFIG: supervisors can tell "fix the config" from "retry".
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let command = cli::parse().command;
    if let Err(e) = trine_engine::kernels::prefetch_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match command {
        Command::Node(args) => match &args.action {
            Some(cli::NodeAction::Leave { target, node_id }) => {
                exit(trine_node::cluster_cmd::leave(target, *node_id))
            }
            Some(cli::NodeAction::TrustDataDir { data_dir }) => {
                exit(trine_node::cluster_cmd::trust_data_dir(data_dir))
            }
            None => run_node(&args),
        },
        Command::Testnet(args) => {
            // Started by `trine chaos`: stop (SIGTERM, which stops the
            // nodes) when it dies, even by SIGKILL.
            trine_node::testnet_cmd::tie_to_parent();
            exit(trine_node::testnet_cmd::run(&args))
        }
        Command::Status(args) => exit(trine_node::cluster_cmd::status(&args)),
        Command::Nodes(args) => exit(trine_node::cluster_cmd::nodes(&args)),
        Command::Chain(command) => exit(trine_node::cluster_cmd::chain(&command)),
        Command::Deploy(args) => exit(trine_node::deploy_cmd::deploy(&args)),
        Command::Complete(args) => exit(trine_node::complete_cmd::run(&args)),
        Command::Chat(args) => exit(trine_node::complete_cmd::chat(&args)),
        Command::Undeploy(args) => exit(trine_node::deploy_cmd::undeploy(&args)),
        Command::Placement(args) => exit(trine_node::cluster_cmd::placement(&args)),
        Command::Token(command) => exit(trine_node::token_cmd::run(&command)),
        Command::Certs(command) => exit(trine_node::cluster_cmd::certs(&command)),
        Command::Generate(args) => exit(trine_node::generate_cmd::run(&args)),
        Command::Perplexity(args) => exit(trine_node::eval_cmd::perplexity(&args)),
        Command::Model(command) => exit(trine_node::model_cmd::run(&command)),
        Command::Peers(args) => exit(trine_node::peers_cmd::run(&args)),
        Command::Bench(command) => exit(trine_node::bench_cmd::run(&command)),
        Command::Chaos(args) => chaos(&args),
    }
}

fn run_node(args: &NodeArgs) -> ExitCode {
    trine_node::testnet_cmd::tie_to_parent();
    let config = match args.resolve() {
        Ok(config) => config,
        Err(e) => return fail(&e, EXIT_CONFIG),
    };
    if args.print_config {
        #[allow(clippy::print_stdout)]
        {
            print!("{}", config.to_toml());
        }
        return ExitCode::SUCCESS;
    }
    logging::init(config.log_format, &config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("trine")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}"), 1),
    };
    let result = runtime.block_on(node::run(config, shutdown::signals()));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
    }
}

/// `trine chaos`: 0 when every check passed, 1 when one failed, 2 when the
/// run itself could not be made.
fn chaos(args: &trine_chaos::ChaosArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(&format!("locating the trine binary: {e}"), 2),
    };
    match trine_chaos::main(exe, args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => fail(&e, 2),
    }
}

/// A one-shot command's result as an exit status (1 and one line on failure).
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
    }
}

fn fail(error: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(code)
}
