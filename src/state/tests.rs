//! State file and lock tests: atomic writes, symlinks, FIFOs, modes, owners, the lock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use std::time::Duration;

fn sample() -> State {
    let mut s = State::new(
        Uuid::nil(),
        "https://api.example/v1",
        Secret::new("tok-1"),
        Some(&Secret::new("boot")),
    );
    s.token_type = Some("Bearer".into());
    s.token_expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000));
    s.last_success_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000));
    s.consecutive_failures = 3;
    s.last_error = Some("HTTP 500".into());
    s
}

#[test]
fn round_trip_with_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path().join("a/b"));
    assert!(store.load().unwrap().0.is_none());
    let s = sample();
    store.save(&s).unwrap();
    let (back, warnings) = store.load().unwrap();
    assert_eq!(back.unwrap(), s);
    assert!(warnings.is_empty());
    let fmode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
    let dmode = fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
    assert_eq!(fmode, 0o600);
    assert_eq!(dmode, 0o700);
    // No temp files left behind.
    let names: Vec<_> = fs::read_dir(store.dir()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

/// A shared directory (sticky or writable by every user: `/tmp`) is never the agent's to
/// tighten, even when it owns it (root and a root-owned `/tmp`): refused, its mode unchanged.
#[test]
fn a_shared_directory_is_never_tightened() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    fs::create_dir(&dir).unwrap();
    let store = StateStore::new(&dir);
    for mode in [0o1777, 0o777, 0o1700, 0o1755] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        let got = store.ensure_dir();
        let now = fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(now, mode, "{mode:04o}: the mode was changed");
        let e = got.unwrap_err().to_string();
        assert!(e.contains("shared directory"), "{mode:04o}: {e}");
    }
}

#[test]
fn open_dir_and_file_are_tightened() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path().join("s"));
    store.save(&sample()).unwrap();
    fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).unwrap();
    let w = store.ensure_dir().unwrap();
    assert!(w.unwrap().contains("tightened"));
    let (_, warnings) = store.load().unwrap();
    assert_eq!(warnings.len(), 1);
    let fmode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(fmode, 0o600);
}

/// A directory another user owns is never changed: open for reading → used as it is with a
/// warning; writable by others → refused, naming the owner and the fix. (Root only: it needs a
/// directory that belongs to someone else.)
#[test]
fn a_directory_of_another_user_is_used_as_it_is_or_refused() {
    if crate::perms::current_uid() != Some(0) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let store = StateStore::new(&dir);
    for (mode, refused) in [
        (0o755, false),
        (0o750, false),
        (0o775, true),
        (0o777, true),
        (0o1777, true),
    ] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        let got = store.ensure_dir();
        let now = fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(now, mode, "{mode:04o}: the mode was changed");
        match got {
            Ok(w) if !refused => assert!(w.unwrap().contains("used as it is")),
            Err(e) if refused => {
                let e = e.to_string();
                assert!(e.contains("uid 65534") && e.contains("chmod 700"), "{e}");
            }
            other => panic!("{mode:04o}: {other:?}"),
        }
    }
    // A file of another user in a directory of ours: read, not changed.
    let ours = StateStore::new(tmp.path().join("t"));
    ours.save(&sample()).unwrap();
    fs::set_permissions(ours.path(), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(ours.path(), Some(65534), None).unwrap();
    let (state, _) = ours.load().unwrap();
    assert!(state.is_some());
    let fmode = fs::metadata(ours.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(fmode, 0o640);
}

#[test]
fn file_in_the_way_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("s");
    fs::write(&p, "x").unwrap();
    let e = StateStore::new(&p).save(&sample()).unwrap_err().to_string();
    assert!(e.contains(&p.display().to_string()), "{e}");
}

#[test]
fn corrupt_file_is_reported_and_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path());
    fs::write(store.path(), "{ not json").unwrap();
    assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
    let aside = store.quarantine().unwrap();
    assert!(aside.exists());
    assert!(store.load().unwrap().0.is_none());
}

#[test]
fn stale_temp_files_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path());
    store.save(&sample()).unwrap();
    fs::write(tmp.path().join(".state.json.abc123.tmp"), "half").unwrap();
    fs::write(tmp.path().join("unrelated.tmp"), "keep").unwrap();
    let lock = store.lock().unwrap();
    assert_eq!(lock.remove_stale_temp_files(), 1);
    assert!(store.path().exists());
    assert!(tmp.path().join("unrelated.tmp").exists());
}

#[test]
fn expiry() {
    let mut s = sample();
    let now = SystemTime::now();
    s.token_expires_at = Some(now - Duration::from_secs(1));
    assert!(s.token_expired(now));
    s.token_expires_at = None;
    assert!(!s.token_expired(now));
}

#[test]
fn a_symlink_in_place_of_the_state_file_is_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path().join("s"));
    store.ensure_dir().unwrap();
    // The target is a valid state file outside the directory: it must not be read,
    // chmodded or written through the link.
    let outside = tmp.path().join("outside.json");
    StateStore::new(tmp.path()).save(&sample()).unwrap();
    fs::rename(tmp.path().join(STATE_FILE), &outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
    let before = fs::read(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, store.path()).unwrap();
    let e = store.load().unwrap_err();
    assert!(
        matches!(
            e,
            StateError::NotAFile {
                what: "a symlink",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("symlink"), "{e}");
    assert_eq!(
        fs::metadata(&outside).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // Saving replaces the link itself, not its target.
    store.save(&sample()).unwrap();
    assert!(
        !fs::symlink_metadata(store.path())
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(&outside).unwrap(), before);
    // Moving aside moves the link, not the target.
    std::os::unix::fs::symlink(&outside, store.dir().join("x")).unwrap();
    let aside = store.move_aside("x", "symlink").unwrap();
    assert!(
        fs::symlink_metadata(aside)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(outside.exists());
}

#[test]
fn a_fifo_or_directory_in_place_of_the_state_file_is_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path());
    let st = std::process::Command::new("mkfifo")
        .arg(store.path())
        .status()
        .unwrap();
    assert!(st.success());
    let e = store.load().unwrap_err();
    assert!(
        matches!(
            e,
            StateError::NotAFile {
                what: "a special file",
                ..
            }
        ),
        "{e}"
    );
    fs::remove_file(store.path()).unwrap();
    fs::create_dir(store.path()).unwrap();
    let e = store.load().unwrap_err();
    assert!(
        matches!(
            e,
            StateError::NotAFile {
                what: "a directory",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn one_lock_holder_per_directory_and_it_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path().join("s"));
    let held = store.lock().unwrap();
    let e = StateStore::new(tmp.path().join("s")).lock().unwrap_err();
    match &e {
        LockError::Held { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
        other => panic!("{other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("systemctl stop exalsius-node-agent"), "{msg}");
    drop(held);
    assert!(store.lock().is_ok());
    let mode = fs::metadata(store.dir().join(LOCK_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_symlinked_lock_file_is_moved_aside_and_its_target_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path().join("s"));
    store.ensure_dir().unwrap();
    let outside = tmp.path().join("victim");
    fs::write(&outside, "precious").unwrap();
    std::os::unix::fs::symlink(&outside, store.dir().join(LOCK_FILE)).unwrap();
    let _lock = store.lock().unwrap();
    assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
    assert!(
        fs::symlink_metadata(store.dir().join(LOCK_FILE))
            .unwrap()
            .is_file()
    );
}

/// The packaged flow: root runs `register` into the directory systemd made for the service
/// user; the files must belong to that user. Runs only as root (CI is root).
#[test]
fn files_root_writes_belong_to_the_directory_owner() {
    use std::os::unix::fs::MetadataExt;
    if !crate::perms::is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65533)).unwrap();
    let store = StateStore::new(&dir);
    let _lock = store.lock().unwrap();
    store.save(&sample()).unwrap();
    for name in [STATE_FILE, LOCK_FILE] {
        let m = fs::metadata(dir.join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65533), "{name}");
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{name}");
    }
    // A root-owned directory keeps root's files root's.
    let rootdir = tmp.path().join("r");
    StateStore::new(&rootdir).save(&sample()).unwrap();
    assert_eq!(fs::metadata(rootdir.join(STATE_FILE)).unwrap().uid(), 0);
}

/// `register --force` / `import-legacy --force` keep the old state by copy: `state.json` stays
/// until the new state replaces it atomically, so a failing write leaves the token in place.
#[test]
fn a_backup_is_a_copy_and_state_json_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path());
    assert_eq!(store.backup().unwrap(), None, "nothing to keep yet");
    let old = sample();
    store.save(&old).unwrap();
    let bytes = fs::read(store.path()).unwrap();
    let bak = store.backup().unwrap().unwrap();
    assert_eq!(fs::read(&bak).unwrap(), bytes);
    assert_eq!(
        fs::read(store.path()).unwrap(),
        bytes,
        "state.json is still there"
    );
    // A second backup replaces the first copy, never leaving a staging file.
    let mut newer = sample();
    newer.access_token = Secret::new("tok-2");
    store.save(&newer).unwrap();
    store.backup().unwrap();
    assert_eq!(
        store.load().unwrap().0.unwrap().access_token,
        Secret::new("tok-2")
    );
    let text = fs::read_to_string(&bak).unwrap();
    assert!(text.contains("tok-2"), "{text}");
    let mut names: Vec<String> = fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["state.json", "state.json.bak"]);
}

/// A rollback: a state written by a newer version (a higher format, fields this one does not
/// know) is read with a warning, its token used, and written back with every unknown field and
/// the newer format number — never in an older shape.
#[test]
fn a_newer_format_is_kept_whole_through_a_save() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::new(tmp.path().join("s"));
    store.save(&sample()).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(store.path()).unwrap()).unwrap();
    assert_eq!(written["format"], STATE_FORMAT);
    let mut newer = written.clone();
    newer["format"] = 7.into();
    newer["refresh_token"] = "rt-SECRET".into();
    newer["nested"] = serde_json::json!({"a": [1, 2, {"b": null}]});
    fs::write(store.path(), serde_json::to_vec(&newer).unwrap()).unwrap();
    let (state, warnings) = store.load().unwrap();
    let mut state = state.unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("format 7") && w.contains("kept")),
        "{warnings:?}"
    );
    assert_eq!(
        state.access_token.expose(),
        written["access_token"].as_str().unwrap()
    );
    assert!(
        !format!("{state:?}").contains("rt-SECRET"),
        "unknown values are never shown"
    );
    // The token rotates and is saved: the newer fields and format survive.
    state.access_token = crate::secret::Secret::new("rotated-2");
    store.save(&state).unwrap();
    let back: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(store.path()).unwrap()).unwrap();
    assert_eq!(back["format"], 7);
    assert_eq!(back["refresh_token"], "rt-SECRET");
    assert_eq!(back["nested"], newer["nested"]);
    assert_eq!(back["access_token"], "rotated-2");
    // A file from before the field existed is format 1, written back as 1.
    let mut old = written;
    old.as_object_mut().unwrap().remove("format");
    fs::write(store.path(), serde_json::to_vec(&old).unwrap()).unwrap();
    let (state, warnings) = store.load().unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    store.save(&state.unwrap()).unwrap();
    let back: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(store.path()).unwrap()).unwrap();
    assert_eq!(back["format"], 1);
}
