//! OS name (`PRETTY_NAME` of os-release) and kernel release (`uname -r`).

use std::path::Path;

/// `PRETTY_NAME` from `{root}/etc/os-release`, else `{root}/usr/lib/os-release`
/// (os-release(5)); falls back to `NAME VERSION_ID`, then "Linux".
pub fn os_name(root: &Path) -> String {
    ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(root.join(p)).ok())
        .and_then(|text| parse_os_release(&text))
        .unwrap_or_else(|| "Linux".to_string())
}

/// `PRETTY_NAME` (or `NAME VERSION_ID`) of os-release text.
pub fn parse_os_release(text: &str) -> Option<String> {
    let get = |key: &str| {
        text.lines().find_map(|l| {
            let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
            let v = v.trim().trim_matches('"').trim_matches('\'').trim();
            (!v.is_empty()).then(|| v.to_string())
        })
    };
    get("PRETTY_NAME").or_else(|| match (get("NAME"), get("VERSION_ID")) {
        (Some(n), Some(v)) => Some(format!("{n} {v}")),
        (Some(n), None) => Some(n),
        _ => None,
    })
}

/// Kernel release from `{root}/proc/sys/kernel/osrelease` (what `uname -r` prints).
pub fn kernel_release(root: &Path) -> String {
    std::fs::read_to_string(root.join("proc/sys/kernel/osrelease"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| sysinfo::System::kernel_version().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_forms() {
        assert_eq!(
            parse_os_release("NAME=\"Ubuntu\"\nPRETTY_NAME=\"Ubuntu 24.04.1 LTS\"\n").as_deref(),
            Some("Ubuntu 24.04.1 LTS")
        );
        assert_eq!(
            parse_os_release("NAME='Rocky Linux'\nVERSION_ID=9.4\n").as_deref(),
            Some("Rocky Linux 9.4")
        );
        assert_eq!(parse_os_release("# nothing\n"), None);
    }

    #[test]
    fn kernel_matches_uname() {
        let out = std::process::Command::new("uname")
            .arg("-r")
            .output()
            .unwrap();
        assert_eq!(
            kernel_release(Path::new("/")),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
}
