//! The footprint and fleet benchmarks (run through `bench/run`, which builds everything in
//! release mode first). Prints a Markdown table and writes CSVs for the fleet plot.
//!
//! Usage: `bench [--quick] [--fleet N] [--out DIR] AGENT_BIN FLOOR_BIN`
//!
//! Everything talks to an HTTP/1.1 stand-in for the API inside this process on 127.0.0.1.
//! Process figures come from /proc of the measured process only (the stand-in's own CPU and
//! memory are not counted).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use exalsius_node_agent::config::{Config, Overrides};
use exalsius_node_agent::heartbeat::{self, Control, Mode};
use exalsius_node_agent::inventory::{Collector, FixedCollector, HostCollector};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The stand-in.

#[derive(Default)]
struct Stats {
    /// Requests per node id (footprint runs tell the agent and the floor apart by it).
    per_node: HashMap<String, u64>,
    /// First request time per node id.
    first: HashMap<String, Instant>,
    /// Requests per 100 ms bucket since `t0` (fleet).
    buckets: Vec<u64>,
    /// The same, without each node's first request (the start-up splay's figure).
    later_buckets: Vec<u64>,
}

struct Server {
    addr: SocketAddr,
    fail: Arc<AtomicBool>,
    stats: Arc<Mutex<Stats>>,
    t0: Arc<Mutex<Instant>>,
    total: Arc<AtomicU64>,
}

fn start_server() -> Server {
    let fail = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let t0 = Arc::new(Mutex::new(Instant::now()));
    let total = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let (f, s, t, n) = (fail.clone(), stats.clone(), t0.clone(), total.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (f, s, t, n) = (f.clone(), s.clone(), t.clone(), n.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (f, s, t, n) = (f.clone(), s.clone(), t.clone(), n.clone());
                        async move {
                            let node = req.uri().path().rsplit('/').next().unwrap_or("").to_string();
                            let k = n.fetch_add(1, Ordering::Relaxed);
                            {
                                let mut st = s.lock().unwrap();
                                let bucket = t.lock().unwrap().elapsed().as_millis() as usize / 100;
                                if st.buckets.len() <= bucket {
                                    st.buckets.resize(bucket + 1, 0);
                                    st.later_buckets.resize(bucket + 1, 0);
                                }
                                st.buckets[bucket] += 1;
                                let seen = st.per_node.entry(node.clone()).or_default();
                                *seen += 1;
                                if *seen > 1 {
                                    st.later_buckets[bucket] += 1;
                                }
                                st.first.entry(node.clone()).or_insert_with(Instant::now);
                            }
                            let resp = if f.load(Ordering::Relaxed) {
                                Response::builder()
                                    .status(503)
                                    .header("content-type", "application/problem+json")
                                    .body(Full::new(Bytes::from_static(
                                        br#"{"title":"Service Unavailable","detail":"outage"}"#,
                                    )))
                            } else {
                                let body = format!(
                                    r#"{{"node_id":"{node}","next_access_token":"bench-token-{k}","next_access_token_expires_in":3600,"next_access_token_type":"Bearer"}}"#
                                );
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                            };
                            Ok::<_, std::convert::Infallible>(resp.unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
    });
    Server {
        addr: rx.recv().unwrap(),
        fail,
        stats,
        t0,
        total,
    }
}

impl Server {
    fn count(&self, node: &str) -> u64 {
        self.stats
            .lock()
            .unwrap()
            .per_node
            .get(node)
            .copied()
            .unwrap_or(0)
    }
    fn first(&self, node: &str) -> Option<Instant> {
        self.stats.lock().unwrap().first.get(node).copied()
    }
    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

// ---------------------------------------------------------------------------------------------
// /proc figures of one process.

#[derive(Debug, Clone, Copy, Default)]
struct Proc {
    rss_kib: u64,
    anon_kib: u64,
    hwm_kib: u64,
    threads: u64,
    fds: u64,
    cpu_ns: u64,
}

fn proc_of(pid: u32) -> Proc {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Nanoseconds on CPU (user + system) of every thread of the process: /proc/PID/task/*/
    // schedstat (utime/stime in /proc/PID/stat only count 10 ms ticks).
    let cpu_ns = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| {
                    s.split_whitespace()
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .sum()
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Proc {
        rss_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        hwm_kib: field("VmHWM:"),
        threads: field("Threads:"),
        fds,
        cpu_ns,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// 1. Steady footprint: agent and floor side by side.

struct Footprint {
    peak_kib: u64,
    anon_kib: u64,
    rss200: u64,
    rss_end: u64,
    fds: (u64, u64),
    threads: (u64, u64),
    cpu_ms_per_req: f64,
}

fn agent_config(dir: &Path, url: &str, node: &str, interval: &str) -> PathBuf {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nurl = \"{url}\"\nnode_id = \"{node}\"\naccess_token = \"bench-boot\"\n\n\
             [heartbeat]\ninterval = \"{interval}\"\njitter = 0.0\n\n[inventory]\ngpu = \"auto\"\n\n\
             [state]\ndir = \"{}\"\n\n[log]\nlevel = \"warn\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    cfg
}

fn spawn(bin: &Path, args: &[&str]) -> Child {
    Command::new(bin)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()))
}

fn footprint(server: &Server, agent: &Path, floor: &Path, n: u64) -> [Footprint; 3] {
    let dir = tempfile::tempdir().unwrap();
    let nodes = [
        "0a0a0a0a-0000-4000-8000-000000000001",
        "0f0f0f0f-0000-4000-8000-000000000002",
        "0f0f0f0f-0000-4000-8000-000000000003",
    ];
    let cfg = agent_config(dir.path(), &server.url(), nodes[0], "50ms");
    let persist = dir.path().join("floor-state");
    std::fs::create_dir_all(&persist).unwrap();
    let mut children = [
        spawn(agent, &["run", "--config", cfg.to_str().unwrap()]),
        spawn(
            floor,
            &[&format!("{}/node/{}", server.url(), nodes[1]), "50"],
        ),
        spawn(
            floor,
            &[
                &format!("{}/node/{}", server.url(), nodes[2]),
                "50",
                persist.to_str().unwrap(),
            ],
        ),
    ];
    let mut at200: [Option<(Proc, u64)>; 3] = [None; 3];
    let mut at_end: [Option<(Proc, u64)>; 3] = [None; 3];
    let deadline = Instant::now() + Duration::from_secs(n * 50 / 1000 * 3 + 60);
    while at_end.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "footprint run did not finish");
        for i in 0..3 {
            let c = server.count(nodes[i]);
            let pid = children[i].id();
            if c >= 200 && at200[i].is_none() {
                at200[i] = Some((proc_of(pid), c));
            }
            if c >= n && at_end[i].is_none() {
                at_end[i] = Some((proc_of(pid), c));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let fig = |i: usize| {
        let (p0, c0) = at200[i].unwrap();
        let (p1, c1) = at_end[i].unwrap();
        Footprint {
            peak_kib: p1.hwm_kib,
            anon_kib: p1.anon_kib,
            rss200: p0.rss_kib,
            rss_end: p1.rss_kib,
            fds: (p0.fds, p1.fds),
            threads: (p0.threads, p1.threads),
            cpu_ms_per_req: (p1.cpu_ns - p0.cpu_ns) as f64 / 1e6 / (c1 - c0) as f64,
        }
    };
    [fig(0), fig(1), fig(2)]
}

// ---------------------------------------------------------------------------------------------
// 2-4. Collection, start-up, binary.

fn collection_wall_ms(agent: &Path, path_env: &str, runs: usize) -> f64 {
    let times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let st = Command::new(agent)
                .args(["inventory", "--json"])
                .env("PATH", path_env)
                .env("EXALSIUS_AGENT_CONFIG", "/dev/null")
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    median(times)
}

fn collection_instructions(agent: &Path) -> Option<u64> {
    let out_file = std::env::temp_dir().join(format!("bench-callgrind-{}", std::process::id()));
    // Resolved here: the child's PATH is set to a directory without tools.
    let valgrind = exalsius_node_agent::inventory::software::which(
        "valgrind",
        std::env::var_os("PATH").as_deref(),
    )?;
    let out = Command::new(valgrind)
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(agent)
        .args(["inventory", "--json"])
        .env("PATH", "/nonexistent")
        .env("EXALSIUS_AGENT_CONFIG", "/dev/null")
        .stdout(Stdio::null())
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&out_file);
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
}

fn startup_ms(server: &Server, agent: &Path, runs: usize) -> f64 {
    let times: Vec<f64> = (0..runs)
        .map(|i| {
            let dir = tempfile::tempdir().unwrap();
            let node = format!("5a5a5a5a-0000-4000-8000-{i:012}");
            let cfg = agent_config(dir.path(), &server.url(), &node, "1h");
            let t = Instant::now();
            let mut child = Command::new(agent)
                .args(["run", "--config", cfg.to_str().unwrap()])
                .env("PATH", "/nonexistent")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = t + Duration::from_secs(10);
            let first = loop {
                if let Some(at) = server.first(&node) {
                    break at;
                }
                assert!(Instant::now() < deadline, "no first heartbeat");
                std::thread::sleep(Duration::from_micros(200));
            };
            let _ = child.kill();
            let _ = child.wait();
            (first - t).as_secs_f64() * 1000.0
        })
        .collect();
    median(times)
}

// ---------------------------------------------------------------------------------------------
// 5. Fleet.

struct FleetResult {
    steady: f64,
    outage_capped: f64,
    recovery_peak: f64,
    startup_peak: f64,
    /// Peak 1-s rate in the steady phase without each agent's first heartbeat (the first
    /// heartbeats of all agents go out together by design).
    after_first_peak: f64,
    per_second: Vec<u64>,
}

/// Timeline (seconds): 0–steady_end steady, steady_end–outage_end all requests fail, then
/// recovery until end.
/// `jitter`: interval and backoff jitter as shipped (off: both off); `splay`: the random first
/// wait after the first heartbeat, as shipped.
fn fleet(
    n: usize,
    jitter: bool,
    splay: bool,
    steady_s: u64,
    outage_s: u64,
    after_s: u64,
) -> FleetResult {
    let server = start_server();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let inventory = HostCollector::new(exalsius_node_agent::config::GpuMode::Off, None).collect();
    let collector: Arc<dyn Collector> = Arc::new(FixedCollector(inventory));
    let shutdown = tokio_util::sync::CancellationToken::new();
    *server.t0.lock().unwrap() = Instant::now();
    let t0 = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            let text = format!(
                "[api]\nurl = \"{}\"\nnode_id = \"f1ee7000-0000-4000-8000-{i:012}\"\naccess_token = \"fleet\"\n\
                 [heartbeat]\ninterval = \"2s\"\njitter = {}\ninitial_backoff = \"1s\"\nmax_backoff = \"10s\"\n\
                 [state]\ndir = \"{}\"\n",
                server.url(),
                if jitter { 0.1 } else { 0.0 },
                base.path().join(i.to_string()).display()
            );
            let cfg = Config::from_toml(&text, Path::new("fleet.toml"), &Overrides::default(), &|_| None).unwrap();
            let mut agent = heartbeat::prepare(cfg, Mode::Daemon, collector.clone()).unwrap();
            if !jitter {
                agent = agent.without_backoff_jitter();
            }
            if !splay {
                agent = agent.without_splay();
            }
            let control = Control {
                shutdown: shutdown.clone(),
                reload: None,
                reloader: None,
                collectors: None,
            };
            tokio::spawn(agent.run(control));
        }
        tokio::time::sleep_until((t0 + Duration::from_secs(steady_s)).into()).await;
        server.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep_until((t0 + Duration::from_secs(steady_s + outage_s)).into()).await;
        server.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep_until((t0 + Duration::from_secs(steady_s + outage_s + after_s)).into()).await;
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let (buckets, later) = {
        let st = server.stats.lock().unwrap();
        (st.buckets.clone(), st.later_buckets.clone())
    };
    let sec = |s: u64| -> u64 { buckets.iter().skip(s as usize * 10).take(10).sum() };
    // Peak over any 1-second window (10 consecutive 100 ms buckets) in a range of seconds.
    let peak_of = |buckets: &[u64], from: u64, to: u64| -> f64 {
        let (a, b) = (from as usize * 10, (to as usize * 10).min(buckets.len()));
        (a..b.saturating_sub(9))
            .map(|i| buckets[i..i + 10].iter().sum::<u64>())
            .max()
            .unwrap_or(0) as f64
    };
    let peak = |from: u64, to: u64| peak_of(&buckets, from, to);
    let mean = |from: u64, to: u64| -> f64 {
        (from..to).map(sec).sum::<u64>() as f64 / (to - from) as f64
    };
    let total = steady_s + outage_s + after_s;
    FleetResult {
        steady: mean(steady_s / 2, steady_s),
        outage_capped: mean(steady_s + outage_s - 10, steady_s + outage_s),
        recovery_peak: peak(steady_s + outage_s, steady_s + outage_s + 20.min(after_s)),
        startup_peak: peak(0, 8),
        after_first_peak: peak_of(&later, 0, steady_s),
        per_second: (0..total).map(sec).collect(),
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    args.retain(|a| a != "--quick");
    let take = |args: &mut Vec<String>, flag: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        let v = args.get(i + 1).cloned();
        args.drain(i..(i + 2).min(args.len()));
        v
    };
    let n_fleet: usize = take(&mut args, "--fleet")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let out = PathBuf::from(take(&mut args, "--out").unwrap_or_else(|| "bench/out".into()));
    let agent = PathBuf::from(args.first().expect("AGENT_BIN"));
    let floor = PathBuf::from(args.get(1).expect("FLOOR_BIN"));
    std::fs::create_dir_all(&out).unwrap();
    let heartbeats = if quick { 400 } else { 2000 };

    let server = start_server();
    eprintln!("footprint: {heartbeats} heartbeats at 50 ms, agent and floor side by side…");
    let [a, f, fp] = footprint(&server, &agent, &floor, heartbeats);
    eprintln!("collection, start-up…");
    let coll_bare = collection_wall_ms(&agent, "/nonexistent", 30);
    let coll_docker = collection_wall_ms(&agent, &std::env::var("PATH").unwrap_or_default(), 30);
    let instr = collection_instructions(&agent);
    let startup = startup_ms(&server, &agent, 15);
    let size = std::fs::metadata(&agent).map(|m| m.len()).unwrap_or(0);

    let (steady_s, outage_s, after_s) = if quick { (10, 30, 20) } else { (20, 30, 30) };
    eprintln!(
        "fleet: {n_fleet} agents, steady {steady_s}s, outage {outage_s}s, recovery {after_s}s (jitter on)…"
    );
    let with = fleet(n_fleet, true, true, steady_s, outage_s, after_s);
    eprintln!("fleet: same without the start splay…");
    let no_splay = fleet(n_fleet, true, false, steady_s, outage_s, after_s);
    eprintln!("fleet: same with backoff and interval jitter and the splay off…");
    let without = fleet(n_fleet, false, false, steady_s, outage_s, after_s);
    let mut csv = String::from("second,with_jitter,no_splay,without_jitter\n");
    for (i, ((x, z), y)) in with
        .per_second
        .iter()
        .zip(&no_splay.per_second)
        .zip(&without.per_second)
        .enumerate()
    {
        csv.push_str(&format!("{i},{x},{z},{y}\n"));
    }
    std::fs::write(out.join("fleet.csv"), csv).unwrap();

    let growth = a.rss_end as i64 - a.rss200 as i64;
    let nf = n_fleet as f64;
    println!("| measure | agent | floor | floor + token persisted | ratio to floor / target |");
    println!("|---|---|---|---|---|");
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "| peak RSS (VmHWM) | {:.2} MiB | {:.2} MiB | {:.2} MiB | {:.2}× (≤ 1.5×) |",
        mib(a.peak_kib),
        mib(f.peak_kib),
        mib(fp.peak_kib),
        a.peak_kib as f64 / f.peak_kib as f64
    );
    println!(
        "| of which anonymous (RssAnon) | {} KiB | {} KiB | {} KiB | {:.2}× |",
        a.anon_kib,
        f.anon_kib,
        fp.anon_kib,
        a.anon_kib as f64 / f.anon_kib as f64
    );
    println!(
        "| RSS after 200 → {heartbeats} heartbeats | {} → {} KiB ({growth:+} KiB) | {} → {} KiB | {} → {} KiB | ≤ 256 KiB growth |",
        a.rss200, a.rss_end, f.rss200, f.rss_end, fp.rss200, fp.rss_end
    );
    println!(
        "| open fds (200 → end) | {} → {} | {} → {} | {} → {} | constant |",
        a.fds.0, a.fds.1, f.fds.0, f.fds.1, fp.fds.0, fp.fds.1
    );
    println!(
        "| threads (200 → end) | {} → {} | {} → {} | {} → {} | constant |",
        a.threads.0, a.threads.1, f.threads.0, f.threads.1, fp.threads.0, fp.threads.1
    );
    println!(
        "| CPU per heartbeat (user+sys) | {:.3} ms | {:.3} ms | {:.3} ms | {:.2}× floor, {:.2}× floor+persist (≤ 1.3×) |",
        a.cpu_ms_per_req,
        f.cpu_ms_per_req,
        fp.cpu_ms_per_req,
        a.cpu_ms_per_req / f.cpu_ms_per_req,
        a.cpu_ms_per_req / fp.cpu_ms_per_req
    );
    println!(
        "| `inventory --json`, no docker/amd-smi/nvidia-smi on PATH (median of 30) | {coll_bare:.2} ms | | | ≤ 6 ms (earlier tool ≈ 23 ms) |"
    );
    println!(
        "| `inventory --json`, docker on PATH (median of 30) | {coll_docker:.2} ms | | | earlier tool ≈ 36 ms |"
    );
    match instr {
        Some(i) => println!(
            "| `inventory --json` instructions (callgrind) | {:.2} M | | | ≤ 10 M (earlier tool ≈ 75 M) |",
            i as f64 / 1e6
        ),
        None => println!("| `inventory --json` instructions | valgrind not found | | | |"),
    }
    println!(
        "| exec → first heartbeat at the server (median of 15) | {startup:.1} ms | | | ≤ 50 ms |"
    );
    println!(
        "| release binary (stripped, as packaged) | {:.2} MiB | | | ≤ 6 MiB |",
        size as f64 / 1048576.0
    );
    println!();
    println!(
        "| fleet of {n_fleet} (interval 2 s, max_backoff 10 s, 30 s outage) | as shipped | without the start splay | without jitter or splay | target |"
    );
    println!("|---|---|---|---|---|");
    let cells = |f: &dyn Fn(&FleetResult) -> String| {
        format!("{} | {} | {}", f(&with), f(&no_splay), f(&without))
    };
    println!(
        "| steady requests/s | {} | |",
        cells(&|r| format!("{:.0}", r.steady))
    );
    println!(
        "| start-up: peak 1-s rate from the second heartbeat on | {} | ≤ 1.5× steady |",
        cells(&|r| format!(
            "{:.0} ({:.2}× steady)",
            r.after_first_peak,
            r.after_first_peak / r.steady
        ))
    );
    println!(
        "| start-up: peak 1-s rate including the first heartbeats | {} | (all at once by design) |",
        cells(&|r| format!("{:.0}", r.startup_peak))
    );
    println!(
        "| outage, backoff capped: requests/s | {} | ≤ 1.4× N/max_backoff |",
        cells(&|r| format!(
            "{:.0} ({:.2}× N/max_backoff)",
            r.outage_capped,
            r.outage_capped / (nf / 10.0)
        ))
    );
    println!(
        "| peak 1-s rate in the 20 s after recovery | {} | ≤ 2× steady |",
        cells(&|r| format!(
            "{:.0} ({:.2}× steady)",
            r.recovery_peak,
            r.recovery_peak / r.steady
        ))
    );
    let _ = server.total.load(Ordering::Relaxed);
}
