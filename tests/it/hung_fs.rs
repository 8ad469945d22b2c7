//! A file system that stops answering (an NFS server gone, a FUSE daemon wedged) under a path
//! the operator chose — the config file, the token file, the CA file, the metrics textfile —
//! costs only the read or write that touches it: the heartbeats on the running configuration
//! go on, and SIGTERM stops the agent within a second, at start and on `systemctl reload`.
//!
//! The mount that never answers is FUSE with no server: `/dev/fuse` opened, mounted with its
//! descriptor, and never read, so every lookup under it waits for ever. Mounting takes root
//! and a mount namespace of its own: as root each test runs itself again under
//! `unshare --mount --propagation private`; otherwise it says "skipped".
// unsafe: mount(2) and umount2(2) have no safe wrapper in the standard library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unsafe_code)]

use crate::support::*;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "EXALSIUS_HUNG_FS_CHILD";

/// A FUSE mount whose server never answers. Dropping it aborts the connection (the last
/// descriptor of `/dev/fuse` closed: every waiting call fails with ENOTCONN) and detaches it.
struct HungMount {
    dir: tempfile::TempDir,
    fd: Option<OwnedFd>,
}

impl HungMount {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("hung");
        std::fs::create_dir(&mnt).unwrap();
        // Close-on-exec (as std opens every file): the agent must not hold the connection open.
        let fd = OwnedFd::from(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .expect("open /dev/fuse"),
        );
        let opts = std::ffi::CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            fd.as_raw_fd()
        ))
        .unwrap();
        let target = std::ffi::CString::new(mnt.to_str().unwrap()).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"hung".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount fuse: {}", std::io::Error::last_os_error());
        Self { dir, fd: Some(fd) }
    }

    /// A path under the mount: any call on it blocks.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join("hung").join(name)
    }
}

impl Drop for HungMount {
    fn drop(&mut self) {
        drop(self.fd.take());
        let target =
            std::ffi::CString::new(self.dir.path().join("hung").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// In the re-executed child: a hung mount. In the parent as root: runs `test` again in a
/// mount namespace of its own, checks that it passed, and returns `None`; not root: says
/// "skipped" and returns `None`.
fn hung_mount_or_rerun(test: &str) -> Option<HungMount> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return Some(HungMount::new());
    }
    if !exalsius_node_agent::perms::is_root() {
        eprintln!("skipped: needs root to mount a file system that never answers");
        return None;
    }
    let (out, text) = rerun_in_mount_namespace(
        &format!("{}::{test}", module_path!().trim_start_matches("it::")),
        CHILD_ENV,
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{test}:\n{text}");
    assert!(text.contains("1 passed"), "{text}");
    None
}

/// Points `link` at `target` (replacing whatever is there).
fn symlink(target: &Path, link: &Path) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// The test config with `key` added to `[api]` (an `access_token_file` replaces the token).
fn with_api_key(url: &str, key: &str) -> String {
    let text = config_text(url, "");
    let text = if key.starts_with("access_token_file") {
        text.replace(&format!("access_token = \"{BOOT}\"\n"), "")
    } else {
        text
    };
    text.replace("[api]\n", &format!("[api]\n{key}"))
}

/// Heartbeats keep coming (interval 100 ms: at least 5 in 1.5 s), then SIGTERM stops the
/// agent within a second; what went wrong, if anything.
async fn beats_on_and_stops(api: &StandIn, agent: &mut Agent, case: &str) -> Option<String> {
    let before = api.count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let beats = api.count() - before;
    eprintln!("{case}: {beats} heartbeats in 1.5 s");
    let mut wrong = (beats < 5).then(|| format!("{case}: {beats} heartbeats in 1.5 s"));
    wrong = wrong.or(stops_within_a_second(agent, case));
    wrong
}

/// SIGTERM stops the agent within a second; what went wrong, if anything.
fn stops_within_a_second(agent: &mut Agent, case: &str) -> Option<String> {
    let sent = Instant::now();
    agent.signal("TERM");
    let child = agent.child.as_mut().unwrap();
    while child.try_wait().unwrap().is_none() {
        if sent.elapsed() > slack(5 * SECOND) {
            let _ = child.kill();
            let _ = child.wait();
            agent.child = None;
            return Some(format!(
                "{case}: SIGTERM ignored for 5 s\n{}",
                agent.all_output()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    agent.child = None;
    let took = sent.elapsed();
    eprintln!("{case}: stopped {took:?} after SIGTERM");
    (took >= slack(SECOND)).then(|| format!("{case}: SIGTERM took {took:?}"))
}

/// Every case runs; the test fails with the list of those that went wrong.
fn assert_none_wrong(wrong: Vec<String>) {
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `systemctl reload` with the config file, the CA file, the token file, the metrics file or
/// the NVML library on a mount that stopped answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_onto_a_hung_mount_keeps_the_heartbeats_and_sigterm_works() {
    let Some(mnt) =
        hung_mount_or_rerun("a_reload_onto_a_hung_mount_keeps_the_heartbeats_and_sigterm_works")
    else {
        return;
    };
    let ca = mnt.path("ca.pem");
    let token = mnt.path("token");
    let prom = mnt.path("agent.prom");
    let lib = mnt.path("libnvidia-ml.so.1");
    let cases: [(&str, String); 5] = [
        ("config file", String::new()),
        ("ca_file", format!("ca_file = \"{}\"\n", ca.display())),
        (
            "access_token_file",
            format!("access_token_file = \"{}\"\n", token.display()),
        ),
        (
            "metrics textfile",
            format!("[metrics]\ntextfile = \"{}\"\n", prom.display()),
        ),
        // Loaded by the inventory collection, off the runtime; the stuck `dlopen` holds the
        // loader lock that `exit` takes (src/exit.rs).
        (
            "inventory.nvml_library",
            format!("gpu = \"nvml\"\nnvml_library = \"{}\"\n", lib.display()),
        ),
    ];
    let mut wrong = Vec::new();
    for (case, extra) in cases {
        let (api, mut agent) = setup_with("").await;
        agent.spawn(&[]);
        api.wait_requests(2, 10 * SECOND).await;
        match case {
            "config file" => symlink(&mnt.path("agent.toml"), &agent.config_path()),
            "metrics textfile" => agent.write_config(&config_text(&api.url(), &extra)),
            "inventory.nvml_library" => agent.write_config(&config_text(&api.url(), "").replace(
                "[inventory]\ngpu = \"off\"\n",
                &format!("[inventory]\n{extra}"),
            )),
            _ => agent.write_config(&with_api_key(&api.url(), &extra)),
        }
        agent.signal("HUP");
        wrong.extend(beats_on_and_stops(&api, &mut agent, case).await);
    }
    assert_none_wrong(wrong);
}

/// A start with the config file, the CA file, the token file, the metrics file or the NVML
/// library on a mount that stopped answering: SIGTERM still stops it within a second (and with
/// the metrics file there, the heartbeats go out). A `dlopen` stuck on the NVML library holds
/// glibc's loader lock, which `exit`, a thread's first thread-local destructor and thread
/// creation wait for: the agent leaves with `_exit` and its runtime thread logs before the
/// first collection (NVML in a child process, issue 30, takes `dlopen` out of the agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_hung_mount_stops_on_sigterm() {
    let Some(mnt) = hung_mount_or_rerun("a_start_on_a_hung_mount_stops_on_sigterm") else {
        return;
    };
    let mut wrong = Vec::new();
    for case in [
        "config file",
        "ca_file",
        "access_token_file",
        "metrics textfile",
        "inventory.nvml_library",
    ] {
        let (api, mut agent) = setup_with("").await;
        match case {
            "config file" => symlink(&mnt.path("agent.toml"), &agent.config_path()),
            "ca_file" => agent.write_config(&with_api_key(
                &api.url(),
                &format!("ca_file = \"{}\"\n", mnt.path("ca.pem").display()),
            )),
            "access_token_file" => agent.write_config(&with_api_key(
                &api.url(),
                &format!("access_token_file = \"{}\"\n", mnt.path("token").display()),
            )),
            "inventory.nvml_library" => agent.write_config(&config_text(&api.url(), "").replace(
                "[inventory]\ngpu = \"off\"\n",
                &format!(
                    "[inventory]\ngpu = \"nvml\"\nnvml_library = \"{}\"\n",
                    mnt.path("libnvidia-ml.so.1").display()
                ),
            )),
            _ => agent.write_config(&config_text(
                &api.url(),
                &format!(
                    "[metrics]\ntextfile = \"{}\"\n",
                    mnt.path("agent.prom").display()
                ),
            )),
        }
        agent.spawn(&[]);
        if case == "metrics textfile" {
            let since = Instant::now();
            while api.count() == 0 && since.elapsed() < 5 * SECOND {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if api.count() == 0 {
                wrong.push(format!("{case}: no heartbeat within 5 s"));
            }
            wrong.extend(beats_on_and_stops(&api, &mut agent, case).await);
            continue;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if api.count() != 0 {
            wrong.push(format!("{case}: heartbeats without a configuration"));
        }
        wrong.extend(stops_within_a_second(&mut agent, case));
    }
    assert_none_wrong(wrong);
}

/// The root-filesystem fallback of the storage inventory asks `/` only: another mount that
/// stopped answering (datasets on FUSE, Ceph, Lustre) must not hang the inventory.
#[test]
fn the_root_filesystem_size_does_not_ask_other_mounts() {
    let Some(_mnt) = hung_mount_or_rerun("the_root_filesystem_size_does_not_ask_other_mounts")
    else {
        return;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(exalsius_node_agent::inventory::storage::root_filesystem_bytes());
    });
    let bytes = rx
        .recv_timeout(slack(5 * SECOND))
        .expect("the root filesystem's size hung on another mount");
    assert!(bytes > 0);
}

/// A reload that moves the metrics file off a hung mount: the old file is removed (the
/// configuration no longer names it) on the writing thread, never on the runtime, so the
/// heartbeats go on and the new file is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_the_metrics_file_off_a_hung_mount_keeps_the_heartbeats() {
    let Some(mnt) =
        hung_mount_or_rerun("moving_the_metrics_file_off_a_hung_mount_keeps_the_heartbeats")
    else {
        return;
    };
    let (api, mut agent) = setup_with("").await;
    let hung = format!(
        "[metrics]\ntextfile = \"{}\"\n",
        mnt.path("agent.prom").display()
    );
    agent.write_config(&config_text(&api.url(), &hung));
    agent.spawn(&[]);
    api.wait_requests(3, 10 * SECOND).await;
    let moved = agent.dir.path().join("agent.prom");
    agent.write_config(&config_text(
        &api.url(),
        &format!("[metrics]\ntextfile = \"{}\"\n", moved.display()),
    ));
    agent.signal("HUP");
    let mut wrong: Vec<String> = beats_on_and_stops(&api, &mut agent, "metrics moved")
        .await
        .into_iter()
        .collect();
    if !moved.exists() {
        wrong.push("the new metrics file was never written".into());
    }
    assert_none_wrong(wrong);
}
