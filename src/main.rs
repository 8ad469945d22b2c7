//! Thin entry point: parse the command line, run the command, map the result to an exit code.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    exalsius_node_agent::footprint::mark("start");
    let cli = exalsius_node_agent::cli::Cli::parse();
    exalsius_node_agent::footprint::mark("command line parsed");
    ExitCode::from(exalsius_node_agent::commands::main(cli))
}
