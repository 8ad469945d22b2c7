//! Generates the man page and shell completions from the clap definitions, for the packages.
//!
//! Usage: `gen-docs OUT_DIR` → `exalsius-node-agent.1` (and one page per subcommand),
//! `exalsius-node-agent.bash`,
//! `_exalsius-node-agent` (zsh), `exalsius-node-agent.fish`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::CommandFactory;
use clap_complete::Shell;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("OUT_DIR"));
    std::fs::create_dir_all(&out).unwrap();
    let mut cmd = exalsius_node_agent::cli::Cli::command();
    cmd.build();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .unwrap();
    std::fs::write(out.join("exalsius-node-agent.1"), page).unwrap();
    // One page per subcommand (`man exalsius-node-agent-run`), as git does.
    // Hidden subcommands (the internal `nvml-probe`) get no page.
    for sub in cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        let name = format!("exalsius-node-agent-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().name(&*Box::leak(name.clone().into_boxed_str())))
            .render(&mut page)
            .unwrap();
        std::fs::write(out.join(format!("{name}.1")), page).unwrap();
    }
    for (shell, file) in [
        (Shell::Bash, "exalsius-node-agent.bash"),
        (Shell::Zsh, "_exalsius-node-agent"),
        (Shell::Fish, "exalsius-node-agent.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "exalsius-node-agent", &mut buf);
        std::fs::write(out.join(file), buf).unwrap();
    }
}
