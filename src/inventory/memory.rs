//! Memory: total RAM, read through sysinfo with a RAM-only refresh.

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// Total RAM in bytes (0 when it cannot be read).
pub fn total_bytes() -> u64 {
    match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
            sys.total_memory()
        }
        Err(e) => {
            tracing::warn!("cannot read memory size: {e}");
            0
        }
    }
}

/// Bytes → GiB rounded to nearest, saturating at `i32::MAX` (the API's int32).
pub fn gib_rounded(bytes: u64) -> i32 {
    units_rounded(bytes, GIB)
}

/// `bytes / unit` rounded to nearest, saturating at `i32::MAX` (the API's integers are int32).
pub fn units_rounded(bytes: u64, unit: f64) -> i32 {
    let g = (bytes as f64 / unit).round();
    if g >= f64::from(i32::MAX) {
        i32::MAX
    } else {
        g as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(gib_rounded(0), 0);
        assert_eq!(gib_rounded(85_520_809_984), 80); // H100 80GB: 79.6 GiB
        assert_eq!(gib_rounded((1 << 30) / 2 - 1), 0);
        assert_eq!(gib_rounded((1 << 30) / 2), 1);
        assert_eq!(gib_rounded(u64::MAX), i32::MAX);
    }

    #[test]
    fn agrees_with_proc_meminfo() {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kb: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert_eq!(gib_rounded(total_bytes()), gib_rounded(kb * 1024));
    }
}
