//! `check-config`: validate the configuration and print the effective values.

use super::{Exit, load_config};
use crate::config::Overrides;

/// Runs `check-config`: 0 when valid (the values on stdout, tokens redacted), 78 when not.
pub fn run(overrides: &Overrides) -> Result<(), Exit> {
    let cfg = load_config(overrides)?;
    crate::api::ApiClient::new(&cfg.api).map_err(|e| {
        if e.is_machine_fault() {
            Exit::runtime(e.to_string())
        } else {
            Exit::config(format!("configuration error: {e}"))
        }
    })?;
    let source = cfg.source.as_deref().map_or_else(
        || {
            format!(
                "no config file ({} not found): defaults and environment",
                crate::config::DEFAULT_CONFIG_PATH
            )
        },
        |p| p.display().to_string(),
    );
    crate::outln!("# effective configuration from {source}")?;
    for w in &cfg.warnings {
        crate::outln!("# warning: {w}")?;
    }
    if !cfg.origins.is_empty() {
        crate::outln!("# where the values came from (the others are defaults):")?;
        for (key, origin) in &cfg.origins {
            crate::outln!("#   {key:<30} {origin}")?;
        }
    }
    crate::out!("{}", cfg.to_redacted_toml())?;
    if cfg.api.node_id.is_none() || cfg.api.access_token.is_none() {
        crate::outln!(
            "# note: api.node_id/api.access_token not both set: `run` needs them, or a node registered with `register`"
        )?;
    }
    Ok(())
}
