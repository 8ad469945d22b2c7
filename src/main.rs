//! Thin entry point: parse the command line, run the command, map the result to an exit code.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    exalsius_node_agent::footprint::mark("start");
    let cli = exalsius_node_agent::cli::Cli::parse();
    exalsius_node_agent::footprint::mark("command line parsed");
    // Not `exit`: a thread stuck in `dlopen` on a hung mount would hold it (see `exit`).
    exalsius_node_agent::exit::now(exalsius_node_agent::commands::main(cli))
}
