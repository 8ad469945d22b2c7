//! Storage: total capacity of the local physical disks, each counted once.
//!
//! Rule: every entry of `{root}/sys/block` except virtual and removable devices, sized by its
//! `size` file (always in 512-byte sectors). Virtual: whatever the kernel files under
//! `/sys/devices/virtual/block` (`/sys/block/X` is a symlink there: ZFS zvols, bcache, DRBD, nbd,
//! device-mapper, md, loop, zram — whatever the name), and by name, for trees without those
//! links: `loop*`, `ram*`, `zram*`, `dm-*`, `md*`, `nbd*`, `rbd*` (a Ceph image: storage of
//! the cluster, not of this node; the kernel files it under `/sys/devices/rbd`), `zd*`,
//! `bcache*`, `drbd*`, `sr*`, `fd*`; removable: `removable` is 1. Partitions live below their disk
//! in sysfs, so they are not counted again; device-mapper and md devices are views of disks
//! already counted. Multipath counts once: a SCSI disk held by a multipath map (a `dm-*` whose
//! `dm/uuid` starts with `mpath-`) is a path, and the map is counted instead; NVMe's hidden
//! per-controller paths (`nvmeXcYnZ`) are skipped, the namespace head (`nvmeXnY`) counts. When
//! no disk is found (some containers, VMs with odd drivers), the root filesystem's size is used
//! instead.

use serde::Serialize;
use std::path::Path;

/// Prefixes of block devices that are not physical disks.
const VIRTUAL_PREFIXES: &[&str] = &[
    "loop", "ram", "zram", "dm-", "md", "nbd", "rbd", "zd", "bcache", "drbd", "sr", "fd",
];

/// True when `/sys/block/{name}` points into `/sys/devices/virtual/` (no hardware behind it).
fn is_virtual(block: &Path, name: &str) -> bool {
    std::fs::read_link(block.join(name))
        .is_ok_and(|target| target.components().any(|c| c.as_os_str() == "virtual"))
}
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

/// True for a device-mapper device that is a multipath map.
fn is_multipath_map(block: &Path, name: &str) -> bool {
    std::fs::read_to_string(block.join(name).join("dm/uuid"))
        .is_ok_and(|u| u.trim_start().starts_with("mpath-"))
}

/// True for NVMe's per-controller path devices (`nvme0c1n1`), hidden behind `nvme0n1`.
fn is_nvme_path(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match rest
        .split_once('c')
        .and_then(|(ctrl, r)| Some((ctrl, r.split_once('n')?)))
    {
        Some((ctrl, (path, ns))) => digits(ctrl) && digits(path) && digits(ns),
        None => false,
    }
}

/// Physical disks under `{root}/sys/block`, each counted once (see the module docs).
pub fn disks(root: &Path) -> Vec<Disk> {
    let block = root.join("sys/block");
    let Ok(entries) = std::fs::read_dir(&block) else {
        return Vec::new();
    };
    let mut out: Vec<Disk> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
            let map = name.starts_with("dm-") && is_multipath_map(&block, &name);
            if !map
                && (is_virtual(&block, &name)
                    || VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p)))
            {
                return None;
            }
            if is_nvme_path(&name) || read("hidden").is_some_and(|h| h.trim() == "1") {
                return None;
            }
            // A path of a multipath map: the map is counted instead.
            let held_by_map = std::fs::read_dir(dir.join("holders")).is_ok_and(|holders| {
                holders
                    .filter_map(Result::ok)
                    .any(|h| is_multipath_map(&block, &h.file_name().to_string_lossy()))
            });
            if held_by_map || read("removable").is_some_and(|r| r.trim() == "1") {
                return None;
            }
            let sectors: u64 = read("size")?.trim().parse().ok()?;
            let bytes = sectors.checked_mul(SECTOR)?;
            if bytes == 0 {
                return None;
            }
            let (name, model) = if map {
                let alias = read("dm/name").map(|n| n.trim().to_string());
                (
                    alias.filter(|n| !n.is_empty()).unwrap_or(name),
                    Some("multipath".to_string()),
                )
            } else {
                let model = read("device/model")
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty());
                (name, model)
            };
            Some(Disk { name, bytes, model })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Size of the filesystem mounted at `/` (the fallback when no disk is found): `statvfs("/")`
/// alone. Listing every mount to find `/` (as sysinfo's disk list does) would `statvfs` each of
/// them, and one that stopped answering (a FUSE, Ceph or Lustre mount of datasets) would hang
/// the inventory until it answers.
pub fn root_filesystem_bytes() -> u64 {
    rustix::fs::statvfs("/").map_or(0, |s| s.f_blocks.saturating_mul(s.f_frsize))
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
    fn multipath_disks_count_once() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/multipath");
        let got: Vec<(String, u64)> = disks(&root)
            .into_iter()
            .map(|d| (d.name, d.bytes))
            .collect();
        assert_eq!(
            got,
            vec![
                // The SCSI map once (not sda + sdb), the NVMe namespace head once (not its two
                // controller paths), and the local disk under an LVM volume.
                ("mpatha".to_string(), 3_750_748_848 * 512),
                ("nvme0n1".to_string(), 7_501_476_528 * 512),
                ("sdc".to_string(), 937_703_088 * 512),
            ]
        );
        assert!(is_nvme_path("nvme0c1n1") && is_nvme_path("nvme12c3n45"));
        assert!(!is_nvme_path("nvme0n1") && !is_nvme_path("nvme0c1") && !is_nvme_path("nvmexcyn1"));
    }

    /// One 1 TB NVMe disk beside views of storage, `/sys/block` as the symlinks the kernel
    /// makes: a zvol, a Ceph RBD image, bcache, DRBD, and a virtual device with a disk-like
    /// name. Before this rule the node reported 11000 GB.
    #[test]
    fn only_physical_disks_count_whatever_the_name() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/zfs-ceph");
        let got: Vec<String> = disks(&root).into_iter().map(|d| d.name).collect();
        assert_eq!(got, vec!["nvme0n1".to_string()]);
        let bytes: u64 = disks(&root).iter().map(|d| d.bytes).sum();
        assert_eq!(gb_rounded(bytes), 1000);
        assert!(is_virtual(&root.join("sys/block"), "sdz"));
        assert!(!is_virtual(&root.join("sys/block"), "nvme0n1"));
    }

    #[test]
    fn missing_sys_is_empty() {
        assert!(disks(Path::new("/nonexistent")).is_empty());
    }
}
