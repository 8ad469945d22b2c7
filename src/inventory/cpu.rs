//! CPU: logical CPUs of the host that can run work (online), model, sockets, physical cores.
//!
//! Read from `/sys/devices/system/cpu` and `/proc/cpuinfo` under a root directory, so tests run
//! against fixture trees. The count is the host's, not the agent's affinity mask or cgroup
//! quota: the pool schedules the whole machine. It is the *online* CPUs
//! (`/sys/devices/system/cpu/online`, what `getconf _NPROCESSORS_ONLN` reads): a CPU present
//! but offline — SMT switched off with `nosmt` or `smt/control`, a core taken offline by hand
//! — runs nothing.

use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;

/// What is known about the CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CpuInfo {
    /// Logical CPUs (hardware threads) of the host.
    pub logical: u32,
    /// Model name of the first CPU.
    pub model: Option<String>,
    /// Distinct `physical id`s.
    pub sockets: Option<u32>,
    /// Distinct (`physical id`, `core id`) pairs.
    pub physical_cores: Option<u32>,
}

/// Collects CPU facts below `root` (`/` in production).
pub fn collect(root: &Path) -> CpuInfo {
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let parsed = parse_cpuinfo(&cpuinfo);
    let list = |name: &str| {
        std::fs::read_to_string(root.join("sys/devices/system/cpu").join(name))
            .ok()
            .and_then(|s| count_cpu_list(&s))
    };
    let logical = list("online")
        .or_else(|| count_sys_cpus(root))
        .or_else(|| list("present"))
        .or((parsed.processors > 0).then_some(parsed.processors))
        .or_else(|| {
            // Last resort; limited by affinity, but better than nothing.
            std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok())
        })
        .unwrap_or(0);
    CpuInfo {
        logical,
        model: parsed.model,
        sockets: parsed.sockets,
        physical_cores: parsed.cores,
    }
}

/// Counts `cpuN` directories whose `online` file is not `0` (cpu0 on x86 has no such file: it
/// cannot go offline); for trees without the `online` list.
fn count_sys_cpus(root: &Path) -> Option<u32> {
    let entries = std::fs::read_dir(root.join("sys/devices/system/cpu")).ok()?;
    let n = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("cpu")
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
                && std::fs::read_to_string(e.path().join("online"))
                    .map_or(true, |o| o.trim() != "0")
        })
        .count();
    u32::try_from(n).ok().filter(|&n| n > 0)
}

/// Counts a kernel CPU list such as `0-3,8-11,16`.
pub fn count_cpu_list(list: &str) -> Option<u32> {
    let mut total: u32 = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let n = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                b.checked_sub(a)?.checked_add(1)?
            }
            None => {
                part.trim().parse::<u32>().ok()?;
                1
            }
        };
        total = total.checked_add(n)?;
    }
    (total > 0).then_some(total)
}

/// What `/proc/cpuinfo` says.
#[derive(Debug, Default)]
pub struct Parsed {
    /// `processor` entries.
    pub processors: u32,
    /// First model name.
    pub model: Option<String>,
    /// Distinct `physical id`s.
    pub sockets: Option<u32>,
    /// Distinct (`physical id`, `core id`) pairs.
    pub cores: Option<u32>,
}

/// Parses `/proc/cpuinfo` text (x86 and Arm layouts).
pub fn parse_cpuinfo(text: &str) -> Parsed {
    let mut p = Parsed::default();
    let mut sockets = HashSet::new();
    let mut cores = HashSet::new();
    let mut physical_id: Option<String> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => {
                p.processors += 1;
                physical_id = None;
            }
            "model name" | "Model" | "cpu model" if p.model.is_none() && !value.is_empty() => {
                p.model = Some(value.to_string());
            }
            "physical id" => {
                sockets.insert(value.to_string());
                physical_id = Some(value.to_string());
            }
            "core id" => {
                cores.insert((physical_id.clone().unwrap_or_default(), value.to_string()));
            }
            _ => {}
        }
    }
    p.sockets = u32::try_from(sockets.len()).ok().filter(|&n| n > 0);
    p.cores = u32::try_from(cores.len()).ok().filter(|&n| n > 0);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-3\n"), Some(4));
        assert_eq!(count_cpu_list("0-3,8-11,16"), Some(9));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn cpuinfo_two_sockets_with_smt() {
        let mut text = String::new();
        let mut n = 0;
        for socket in 0..2 {
            for core in 0..4 {
                for _thread in 0..2 {
                    text.push_str(&format!(
                        "processor\t: {n}\nmodel name\t: AMD EPYC 9654 96-Core Processor\nphysical id\t: {socket}\ncore id\t\t: {core}\n\n"
                    ));
                    n += 1;
                }
            }
        }
        let p = parse_cpuinfo(&text);
        assert_eq!(p.processors, 16);
        assert_eq!(p.sockets, Some(2));
        assert_eq!(p.cores, Some(8));
        assert_eq!(p.model.as_deref(), Some("AMD EPYC 9654 96-Core Processor"));
    }

    /// A 16-thread host with SMT switched off (`nosmt`, `smt/control` = `off`): 8 CPUs online,
    /// 16 present. Before this rule: 16.
    #[test]
    fn offline_cpus_are_not_counted() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/smt-off");
        let got = collect(&root);
        assert_eq!(got.logical, 8);
        assert_eq!(got.physical_cores, Some(8));
    }

    /// Without the `online` list (an odd tree), each `cpuN/online` decides; cpu0 has none on
    /// x86 (it cannot go offline) and counts.
    #[test]
    fn per_cpu_online_files_decide_without_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = dir.path().join("sys/devices/system/cpu");
        for i in 0..4 {
            std::fs::create_dir_all(cpu.join(format!("cpu{i}"))).unwrap();
            if i > 0 {
                let on = if i % 2 == 1 { "0\n" } else { "1\n" };
                std::fs::write(cpu.join(format!("cpu{i}/online")), on).unwrap();
            }
        }
        std::fs::write(cpu.join("present"), "0-3\n").unwrap();
        assert_eq!(collect(dir.path()).logical, 2);
    }

    /// glibc's `_NPROCESSORS_ONLN` reads the same `online` list.
    #[test]
    fn matches_online_processors_on_this_host() {
        let Ok(out) = std::process::Command::new("getconf")
            .arg("_NPROCESSORS_ONLN")
            .output()
        else {
            return; // no getconf: nothing to compare with
        };
        let want: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(collect(Path::new("/")).logical, want);
    }
}
