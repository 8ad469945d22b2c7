//! Fuzzing of every parser that reads outside input, with proptest (cargo-fuzz needs a nightly
//! toolchain, which this project's machines do not have). Each property runs a bounded number
//! of cases; the seed corpus in `tests/fuzz-corpus/` is replayed first, and proptest keeps any
//! failure it finds in `proptest-regressions/` so it is replayed on every run.
//!
//! The property for every parser: no panic, whatever the input; errors are one line. Configs
//! and answers that parse are also *used*: the scheduler runs a few simulated cycles on them
//! (every wait added to the monotonic and the wall clock, as the loop does).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exalsius_node_agent::api::{Problem, TokenResponse};
use exalsius_node_agent::config::{Config, Overrides};
use exalsius_node_agent::heartbeat::credentials::registered_state;
use exalsius_node_agent::heartbeat::{Schedule, Verdict};
use exalsius_node_agent::inventory::{cpu, gpu::pci, system};
use proptest::prelude::*;
use std::path::Path;

/// Cases per property: ~1 s each on a 2-core machine.
const CASES: u32 = 3000;

fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {kind}");
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn check_config(text: &str) {
    let r = Config::from_toml(
        text,
        Path::new("/fuzz.toml"),
        &Overrides::default(),
        &|_| None,
    );
    match r {
        Ok(cfg) => simulate(&cfg, None),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
            assert!(
                msg.starts_with("/fuzz.toml"),
                "error does not name the file: {msg}"
            );
        }
    }
}

/// Runs the scheduler for a few simulated cycles of every kind of outcome, adding each wait to
/// the clocks the way the loop does; `expiry` is a token lifetime from an answer.
fn simulate(cfg: &Config, expiry: Option<std::time::Duration>) {
    let mut schedule = Schedule::new(&cfg.heartbeat);
    let mut mono = std::time::Instant::now();
    let mut wall = std::time::SystemTime::now();
    let expires_at = expiry.and_then(|d| wall.checked_add(d));
    let verdicts = [
        Verdict::Ok,
        Verdict::Retryable { retry_after: None },
        Verdict::Retryable {
            retry_after: Some(exalsius_node_agent::api::client::MAX_RETRY_AFTER),
        },
        Verdict::Slow,
        Verdict::Now,
        Verdict::Rejected,
    ];
    for cycle in 0..24 {
        let wait = schedule.next(verdicts[cycle % verdicts.len()], expires_at, wall);
        mono += wait;
        wall += wait;
        let _ = mono + cfg.inventory.refresh_interval;
    }
    schedule.reconfigure(&cfg.heartbeat);
}

fn check_response(bytes: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<TokenResponse>(bytes)
        && let Ok(answer) = r.interpret()
        && let Some(issued) = answer.issued
    {
        let lifetime = issued.expires_in;
        let state = registered_state(uuid::Uuid::nil(), "u", issued, std::time::SystemTime::now());
        let _ = state.token_expires_at;
        simulate(&default_config(), lifetime);
    }
    if let Some(p) = Problem::parse(bytes) {
        let _ = p.to_string();
    }
}

fn check_text_parsers(text: &str) {
    let _ = cpu::parse_cpuinfo(text);
    let _ = cpu::count_cpu_list(text);
    let _ = system::parse_os_release(text);
    let _ = pci::lookup_name(text, 0x10de, 0x2330);
    let _ = pci::normalize_bus_id(text);
    let _ = exalsius_node_agent::commands::register::validate_endpoint(text);
    if let Ok(v) = reqwest::header::HeaderValue::from_str(text) {
        let _ = exalsius_node_agent::api::client::retry_after(
            Some(&v),
            Some(&v),
            std::time::SystemTime::now(),
        );
    }
}

fn default_config() -> Config {
    Config::from_toml("", Path::new("/fuzz.toml"), &Overrides::default(), &|_| {
        None
    })
    .unwrap()
}

#[test]
fn corpus_replays_without_panics() {
    for bytes in corpus("config") {
        check_config(&String::from_utf8_lossy(&bytes));
    }
    for kind in ["response", "problem"] {
        for bytes in corpus(kind) {
            check_response(&bytes);
        }
    }
    for kind in [
        "cpuinfo",
        "os-release",
        "pci-ids",
        "cpu-list",
        "retry-after",
        "endpoint",
    ] {
        for bytes in corpus(kind) {
            check_text_parsers(&String::from_utf8_lossy(&bytes));
        }
    }
}

/// TOML-shaped input built from the real keys, so the fuzzer reaches validation, not just the
/// syntax checker.
fn toml_like() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec!["api", "heartbeat", "inventory", "state", "log", "x"]);
    let key = prop::sample::select(vec![
        "url",
        "node_id",
        "access_token",
        "access_token_file",
        "timeout",
        "connect_timeout",
        "ca_file",
        "allow_insecure_http",
        "interval",
        "jitter",
        "initial_backoff",
        "max_backoff",
        "refresh_interval",
        "gpu",
        "nvml_library",
        "description",
        "dir",
        "level",
        "format",
        "zz",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9:/.\\-]{0,30}".prop_map(|s| format!("\"{s}\"")),
        "[0-9]{1,25}(ns|ms|s|m|h|d|y|)".prop_map(|s| format!("\"{s}\"")),
        any::<String>().prop_map(|s| format!("{s:?}")),
        Just("\"http://127.0.0.1:1/v1\"".to_string()),
        Just("\"123e4567-e89b-12d3-a456-426614174000\"".to_string()),
    ];
    prop::collection::vec((section, prop::collection::vec((key, value), 0..5)), 0..5).prop_map(
        |sections| {
            sections
                .into_iter()
                .map(|(s, kvs)| {
                    let body: String = kvs
                        .into_iter()
                        .map(|(k, v)| format!("{k} = {v}\n"))
                        .collect();
                    format!("[{s}]\n{body}")
                })
                .collect()
        },
    )
}

/// JSON documents shaped like API answers.
fn json_like() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        let key = prop::sample::select(vec![
            "node_id",
            "next_access_token",
            "next_access_token_expires_in",
            "next_access_token_type",
            "detail",
            "title",
            "status",
            "type",
            "instance",
            "x",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key.prop_map(str::to_string), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn config_parser_never_panics_on_arbitrary_text(text in any::<String>()) {
        check_config(&text);
    }

    #[test]
    fn config_parser_never_panics_on_toml_shaped_input(text in toml_like()) {
        check_config(&text);
    }

    #[test]
    fn response_parsers_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_response(&bytes);
    }

    #[test]
    fn response_parsers_never_panic_on_json_shaped_input(v in json_like()) {
        check_response(v.to_string().as_bytes());
    }

    #[test]
    fn inventory_text_parsers_never_panic(text in any::<String>()) {
        check_text_parsers(&text);
    }

    #[test]
    fn inventory_parsers_never_panic_on_proc_shaped_input(
        lines in prop::collection::vec(("(processor|model name|physical id|core id|PRETTY_NAME|NAME|VERSION_ID|\t2330 |10de |[0-9a-f]{4} )", "[ :=\t]{0,2}", ".{0,12}"), 0..20)
    ) {
        let text: String = lines.into_iter().map(|(k, sep, v)| format!("{k}{sep}{v}\n")).collect();
        check_text_parsers(&text);
        check_text_parsers(&format!("\n{text}"));
    }

    #[test]
    fn cpu_lists_count_what_they_say(a in 0u32..5000, len in 0u32..5000, b in 0u32..5000) {
        let list = format!("{a}-{},{b}", a + len);
        prop_assert_eq!(cpu::count_cpu_list(&list), Some(len + 2));
    }
}
