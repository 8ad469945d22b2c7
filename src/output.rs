//! Standard output of the commands. A reader that goes away (`| head`, a closed pipe) is not a
//! fault of the agent: a command whose output *is* its product (`status`, `check-config`,
//! `doctor`, `inventory`, `run --dry-run`) stops there, quietly, with [`EXIT_READER_GONE`];
//! a command that changes something (`register`, `import-legacy`) finishes its work and says
//! what it can ([`say`]). Never a panic: `println!` panics on a closed pipe (exit 101).

use crate::commands::Exit;
use std::io::Write;

/// Exit code when the reader of stdout went away: 128 + SIGPIPE (13), what the shell reports
/// for any Unix tool a closed pipe stops (`yes | head` → 141), so scripts with `pipefail` that
/// already allow for that allow for this; 0 would claim the output was delivered, 1 would read
/// as a failure of the agent.
pub const EXIT_READER_GONE: u8 = 141;

/// The exit for a failed write to stdout: quiet [`EXIT_READER_GONE`] for a closed pipe, else a
/// runtime failure naming the error (a full disk behind a redirection).
pub fn write_error(e: &std::io::Error) -> Exit {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Exit {
            code: EXIT_READER_GONE,
            message: String::new(),
        }
    } else {
        Exit::runtime(format!("cannot write to standard output: {e}"))
    }
}

/// Writes `text` to stdout and flushes it.
pub fn write(text: &str) -> Result<(), Exit> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| write_error(&e))
}

/// Writes `text` and a newline to stdout, for a command whose work is done or must go on
/// whoever reads: a reader that went away changes nothing.
pub fn say(text: &str) {
    let _ = write(&format!("{text}\n"));
}

/// Writes one line to stderr; a closed stderr changes nothing (`eprintln!` would panic).
pub fn warn_line(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "exalsius-node-agent: {text}");
}

/// `println!` that returns `Result<(), Exit>` instead of panicking (see the module docs).
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::output::write(&format!("{}\n", format_args!($($t)*)))
    };
}

/// `print!` that returns `Result<(), Exit>` instead of panicking (see the module docs).
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {
        $crate::output::write(&format!($($t)*))
    };
}

/// `println!` for a command that goes on whoever reads ([`say`]).
#[macro_export]
macro_rules! sayln {
    ($($t:tt)*) => {
        $crate::output::say(&format!($($t)*))
    };
}
