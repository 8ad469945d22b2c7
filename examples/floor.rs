//! The floor for the footprint benchmark: the smallest useful tokio (current_thread) +
//! reqwest (rustls) program that does what the agent does on the wire — one PATCH with a
//! JSON body and a bearer token every interval, reading the whole answer.
//!
//! Usage: `floor URL INTERVAL_MS [PERSIST_DIR]` — with a directory, each new token is also
//! written there the way any careful agent must (temp file, fsync, rename, fsync of the
//! directory): the floor for an agent that must not lose a rotating token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("URL");
    let interval: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let persist = args.next().map(std::path::PathBuf::from);
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let body = br#"{"hardware":{"gpu_count":0,"gpu_vendor":"UNKNOWN","gpu_type":"UNKNOWN","gpu_memory":0,"cpu_cores":2,"memory_gb":24,"storage_gb":275},"software":{"docker":"","nvidia":"","amd":""},"system":{"os":"Debian GNU/Linux 12 (bookworm)","kernel":"6.1.0"}}"#;
    let mut token = "floor-token".to_string();
    loop {
        if let Ok(resp) = client
            .patch(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(&body[..])
            .send()
            .await
            && let Ok(bytes) = resp.bytes().await
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(t) = v["next_access_token"].as_str()
        {
            token = t.to_string();
            if let Some(dir) = &persist {
                persist_token(dir, &token);
            }
        }
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
}

fn persist_token(dir: &std::path::Path, token: &str) {
    use std::io::Write;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
    tmp.write_all(token.as_bytes()).unwrap();
    tmp.as_file().sync_all().unwrap();
    tmp.persist(dir.join("token")).unwrap();
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}
