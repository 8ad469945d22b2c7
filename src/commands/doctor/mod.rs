//! `doctor`: "why is my node offline?" as one checklist. Each line is ✓ (fine), ✗ (broken, with
//! the one thing to do), ! (worth a look) or · (information). It reads and probes only: no
//! heartbeat, no state lock, no file written, never the token.

mod local;
mod net;
mod service;
mod state_dir;
mod tls;
mod unit;

use super::Exit;
use crate::cli::DoctorArgs;
use crate::config::{Config, Overrides, process_env};
use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// ✓
    Ok,
    /// ✗ — makes `doctor` exit 1.
    Fail,
    /// ! — worth a look, not a failure.
    Warn,
    /// · — information (no systemd here, GPU discovery off, …).
    Info,
}

impl Status {
    fn mark(self) -> &'static str {
        match self {
            Status::Ok => "✓",
            Status::Fail => "✗",
            Status::Warn => "!",
            Status::Info => "·",
        }
    }
}

/// One line of the checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked (`config`, `state directory`, `dns`, …).
    pub check: &'static str,
    /// The verdict.
    pub status: Status,
    /// What was found.
    pub finding: String,
    /// For ✗ and !: the one thing to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    /// ✓
    pub fn ok(check: &'static str, finding: String) -> Self {
        Self {
            check,
            status: Status::Ok,
            finding,
            hint: None,
        }
    }

    /// ✗ with what to do.
    pub fn fail(check: &'static str, finding: String, hint: &str) -> Self {
        Self {
            check,
            status: Status::Fail,
            finding,
            hint: Some(hint.to_string()),
        }
    }

    /// ! with what to do.
    pub fn warn(check: &'static str, finding: String, hint: &str) -> Self {
        Self {
            status: Status::Warn,
            ..Self::fail(check, finding, hint)
        }
    }

    /// ·
    pub fn info(check: &'static str, finding: String) -> Self {
        Self {
            status: Status::Info,
            ..Self::ok(check, finding)
        }
    }
}

/// The checklist as text: one line per check, the hint indented below a ✗ or !.
pub fn render(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
    let mut s = String::new();
    for c in checks {
        // Findings quote servers, certificates and files: one line each, whatever they hold.
        s.push_str(&format!(
            "{} {:<width$}  {}\n",
            c.status.mark(),
            c.check,
            crate::text::one_line(&c.finding, 2000)
        ));
        if let Some(h) = &c.hint {
            let h = crate::text::one_line(h, 2000);
            s.push_str(&format!("  {:<width$}  → {h}\n", ""));
        }
    }
    s
}

#[derive(Serialize)]
struct Report<'a> {
    checks: &'a [Check],
    failed: usize,
    warnings: usize,
}

/// Runs `doctor`.
pub fn run(overrides: &Overrides, args: &DoctorArgs) -> Result<(), Exit> {
    let cfg = Config::load(overrides, &process_env);
    // Probe warnings (NVML, PCI) would interleave with the checklist; they are in its lines.
    let level = overrides.log_level.as_deref().unwrap_or("error");
    crate::logging::init(level, Default::default());
    let checks = collect(cfg, args);
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warnings = checks.iter().filter(|c| c.status == Status::Warn).count();
    if args.json {
        let report = Report {
            checks: &checks,
            failed,
            warnings,
        };
        match serde_json::to_string_pretty(&report) {
            Ok(s) => crate::outln!("{s}")?,
            Err(e) => return Err(Exit::runtime(format!("cannot render the report: {e}"))),
        }
    } else {
        crate::out!("{}", render(&checks))?;
        crate::outln!(
            "\n{failed} failed, {warnings} warning{}, {} checks",
            if warnings == 1 { "" } else { "s" },
            checks.len()
        )?;
    }
    if failed > 0 {
        Err(Exit::runtime(format!(
            "doctor: {failed} check{} failed",
            if failed == 1 { "" } else { "s" }
        )))
    } else {
        Ok(())
    }
}

fn collect(cfg: Result<Config, crate::config::ConfigError>, args: &DoctorArgs) -> Vec<Check> {
    let mut checks = Vec::new();
    let unit = unit::Unit::find();
    let user = unit::service_user(args.service_user.as_deref(), &unit);
    let cfg = match cfg {
        Ok(cfg) => {
            checks.push(local::config_check(&cfg, &user));
            Some(cfg)
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                e.to_string(),
                "fix that line; `exalsius-node-agent check-config` shows the effective values",
            ));
            None
        }
    };
    checks.push(user.check());
    let state_dir = cfg.as_ref().map_or_else(
        || crate::config::default_state_dir(&process_env),
        |c| c.state.dir.clone(),
    );
    checks.extend(state_dir::state_checks(&state_dir, &user));
    checks.extend(service::service_checks(&state_dir, &unit));
    let Some(cfg) = cfg else {
        checks.push(Check::info(
            "api",
            "not checked: the configuration is not valid".to_string(),
        ));
        return checks;
    };
    checks.extend(local::heartbeat_checks(&cfg));
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            checks.extend(rt.block_on(net::checks(&cfg, unit.environment())));
            // A resolver or a handshake stuck in a blocking thread must not hold the exit.
            rt.shutdown_background();
        }
        Err(e) => checks.push(Check::fail(
            "api",
            format!("cannot start the runtime: {e}"),
            "out of threads or memory?",
        )),
    }
    checks.push(local::gpu_check(&cfg));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_aligns_and_indents_hints() {
        let text = render(&[
            Check::ok("config", "valid".into()),
            Check::fail("dns", "cannot resolve x".into(), "check the resolver"),
            Check::info("service", "no systemd".into()),
        ]);
        assert_eq!(
            text,
            "✓ config   valid\n✗ dns      cannot resolve x\n           → check the resolver\n· service  no systemd\n"
        );
    }
}
