//! Storage: total capacity of the local physical disks, each counted once.
//!
//! Rule: every entry of `{root}/sys/block` except virtual and removable devices (`loop*`,
//! `ram*`, `zram*`, `dm-*`, `md*`, `nbd*`, `sr*`, `fd*`, and anything whose `removable` is 1),
//! sized by its `size` file (always in 512-byte sectors). Partitions live below their disk
//! in sysfs, so they are not counted again; device-mapper and md devices are views of disks
//! already counted. When no disk is found (some containers, VMs with odd drivers), the root
//! filesystem's size is used instead.

use serde::Serialize;
use std::path::Path;

/// Prefixes of block devices that are not physical disks.
const VIRTUAL_PREFIXES: &[&str] = &["loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd"];
/// `size` in sysfs counts 512-byte sectors regardless of the device's sector size.
const SECTOR: u64 = 512;

/// One physical disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disk {
    /// Kernel name (`nvme0n1`, `sda`).
    pub name: String,
    /// Capacity in bytes.
    pub bytes: u64,
    /// Model string, when sysfs has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Physical disks under `{root}/sys/block`.
pub fn disks(root: &Path) -> Vec<Disk> {
    let Ok(entries) = std::fs::read_dir(root.join("sys/block")) else {
        return Vec::new();
    };
    let mut out: Vec<Disk> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p)) {
                return None;
            }
            let dir = e.path();
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
            if read("removable").is_some_and(|r| r.trim() == "1") {
                return None;
            }
            let sectors: u64 = read("size")?.trim().parse().ok()?;
            let bytes = sectors.checked_mul(SECTOR)?;
            if bytes == 0 {
                return None;
            }
            let model = read("device/model")
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty());
            Some(Disk { name, bytes, model })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Size of the filesystem mounted at `/` (the fallback when no disk is found).
pub fn root_filesystem_bytes() -> u64 {
    let refresh = sysinfo::DiskRefreshKind::nothing().with_storage();
    let Ok(disks) = sysinfo::Disks::new_with_refreshed_list_specifics(refresh) else {
        return 0;
    };
    (&disks)
        .into_iter()
        .find(|d| d.mount_point() == Path::new("/"))
        .map_or(0, sysinfo::Disk::total_space)
}

/// Bytes → GB (10^9) rounded to nearest, saturating at `i32::MAX`.
pub fn gb_rounded(bytes: u64) -> i32 {
    super::memory::units_rounded(bytes, 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gb() {
        assert_eq!(gb_rounded(1_920_383_410_176), 1920);
        assert_eq!(gb_rounded(499_999_999), 0);
        assert_eq!(gb_rounded(500_000_000), 1);
    }

    #[test]
    fn missing_sys_is_empty() {
        assert!(disks(Path::new("/nonexistent")).is_empty());
    }
}
