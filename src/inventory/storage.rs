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
//! per-controller paths (`nvmeXcYnZ`) are skipped, the namespace head (`nvmeXnY`) counts —
//! the kernel files it under `/sys/devices/virtual/nvme-subsystem/`, yet it is a local disk
//! when every controller of its subsystem is on PCIe (NVMe over TCP, RDMA or FC is remote
//! storage: out, with or without multipath). Remote SCSI is out for the same reason: an iSCSI
//! LUN (below its `session`) or a Fibre Channel SAN LUN (below `rport-*`), and a multipath map
//! whose paths are all such LUNs. When
//! no disk is found (some containers, VMs with odd drivers), the root filesystem's size is used
//! instead.

use serde::Serialize;
use std::path::Path;

/// Prefixes of block devices that are not physical disks.
const VIRTUAL_PREFIXES: &[&str] = &[
    "loop", "ram", "zram", "dm-", "md", "nbd", "rbd", "zd", "bcache", "drbd", "sr", "fd",
];

/// True when `/sys/block/{name}` points into `/sys/devices/virtual/` (no hardware behind it),
/// except an NVMe multipath head on local controllers ([`is_local_nvme_head`]).
fn is_virtual(block: &Path, name: &str) -> bool {
    std::fs::read_link(block.join(name)).is_ok_and(|target| {
        target.components().any(|c| c.as_os_str() == "virtual")
            && !is_local_nvme_head(block, name, &target)
    })
}

/// True when `/sys/block/{name}` sits below a remote SCSI transport: an iSCSI session
/// (`…/session3/target…`) or a Fibre Channel remote port (`…/rport-5:0-0/…`): a LUN of a storage
/// array elsewhere, like NVMe over fabrics. Local SAS and SATA disks sit below `port-`/`ata`.
fn is_remote_scsi(block: &Path, name: &str) -> bool {
    std::fs::read_link(block.join(name)).is_ok_and(|target| {
        target.components().any(|c| {
            let c = c.as_os_str().to_string_lossy();
            c.starts_with("rport-")
                || c.strip_prefix("session")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// True for a multipath map whose paths (`slaves/`) are all remote ([`is_remote_scsi`]).
fn is_remote_map(block: &Path, name: &str) -> bool {
    let Ok(slaves) = std::fs::read_dir(block.join(name).join("slaves")) else {
        return false;
    };
    let names: Vec<String> = slaves
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    !names.is_empty() && names.iter().all(|n| is_remote_scsi(block, n))
}

/// NVMe transport of a controller in the same chassis (`/sys/class/nvme/nvmeX/transport`);
/// `tcp`, `rdma`, `fc` and `loop` are storage elsewhere (or a view of it).
const NVME_LOCAL_TRANSPORT: &str = "pcie";

/// True for an NVMe native-multipath namespace head (`/sys/block/nvmeXnY` →
/// `…/devices/virtual/nvme-subsystem/nvme-subsysX/nvmeXnY`) whose subsystem's controllers
/// (the `nvmeN` links beside it) all sit on PCIe: one local disk with several ports. A head
/// with any fabrics controller (NVMe over TCP, RDMA, FC) is remote storage; one with no
/// controller found is not counted (nothing shows it is local).
fn is_local_nvme_head(block: &Path, name: &str, target: &Path) -> bool {
    let mut parents = target.components().rev().skip(1);
    let subsys = parents.next().map(|c| c.as_os_str().to_string_lossy());
    let kind = parents.next().map(|c| c.as_os_str().to_string_lossy());
    if kind.as_deref() != Some("nvme-subsystem")
        || !subsys.is_some_and(|s| s.starts_with("nvme-subsys"))
    {
        return false;
    }
    let Some(subsys_dir) = block.join(name).join("..").canonicalize().ok() else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir(&subsys_dir) else {
        return false;
    };
    let transports: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("nvme")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| {
            std::fs::read_to_string(e.path().join("transport"))
                .map(|t| t.trim().to_string())
                .unwrap_or_default()
        })
        .collect();
    !transports.is_empty() && transports.iter().all(|t| t == NVME_LOCAL_TRANSPORT)
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
            if is_remote_scsi(&block, &name) || (map && is_remote_map(&block, &name)) {
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

    /// A DGX-class host as the kernel lays it out with NVMe native multipath (the Ubuntu and
    /// RHEL default): two single-port 1.92 TB boot drives under their PCI controllers, four
    /// dual-port 3.84 TB drives whose heads the kernel files under
    /// `/sys/devices/virtual/nvme-subsystem/`, one NVMe/TCP multipath namespace and one
    /// NVMe/RDMA namespace (remote: out). Before this rule: 3841 GB.
    /// Generated by `tests/fixtures/gen/nvme-multipath.sh`.
    #[test]
    fn nvme_multipath_heads_are_local_disks_and_fabrics_are_not() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/dgx-nvme");
        let got = disks(&root);
        let names: Vec<&str> = got.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "nvme0n1", "nvme1n1", "nvme2n1", "nvme4n1", "nvme6n1", "nvme8n1"
            ]
        );
        assert_eq!(gb_rounded(got.iter().map(|d| d.bytes).sum()), 19204);
    }

    /// Only multipath disks: they are found, so the root filesystem is not the fallback.
    #[test]
    fn only_multipath_nvme_is_still_found() {
        let root =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/nvme-multipath-only");
        let got: Vec<String> = disks(&root).into_iter().map(|d| d.name).collect();
        assert_eq!(got, vec!["nvme2n1".to_string()]);
    }

    /// Remote block storage over SCSI transports is another machine's, as NVMe-oF is: an
    /// iSCSI LUN (below its `session`) and a Fibre Channel SAN LUN (below `rport-*`), also
    /// joined by a multipath map, are out; the local SAS disk counts. Generated by
    /// `tests/fixtures/gen/san.sh`. Before this rule: 31923 GB instead of 1920.
    #[test]
    fn iscsi_and_fibre_channel_luns_are_remote() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/san");
        let got: Vec<String> = disks(&root).into_iter().map(|d| d.name).collect();
        assert_eq!(got, vec!["sda".to_string()]);
    }

    #[test]
    fn missing_sys_is_empty() {
        assert!(disks(Path::new("/nonexistent")).is_empty());
    }
}
