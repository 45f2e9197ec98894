//! The benchmarked processes, read from /proc: the process tree of a worker (the SDK starts a
//! ping process beside its worker), its CPU time and its peak resident memory, children included,
//! and SIGSTOP/SIGCONT so a queue can be pre-loaded while a warm worker waits.

use std::process::Command;

/// Clock ticks per second of /proc's times (USER_HZ, 100 on Linux whatever the kernel's HZ).
const TICKS_PER_S: f64 = 100.0;

/// Fields of /proc/PID/stat after the command name: (ppid, utime+stime+cutime+cstime in ticks).
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses a /proc/PID/stat line: the command name may hold spaces and parentheses, so the
/// fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<(u32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks = (11..=14)
        .map(|i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum::<Option<u64>>()?;
    Some((ppid, ticks))
}

/// `root` and all its descendants alive now.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            {
                if let Some((ppid, _)) = stat(pid) {
                    parents.push((pid, ppid));
                }
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    found
}

/// CPU seconds (user + system, reaped children included) of `pids` so far.
pub fn cpu_s(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&p| stat(p))
        .map(|(_, t)| t)
        .sum::<u64>() as f64
        / TICKS_PER_S
}

/// Peak resident memory (VmHWM) of `pids`, summed, in bytes.
pub fn peak_rss(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| docparse::child::status_bytes(&p.to_string(), "VmHWM"))
        .sum()
}

/// Sends `signal` (e.g. "STOP", "CONT") to every pid.
pub fn signal(pids: &[u32], signal: &str) {
    let mut kill = Command::new("kill");
    kill.arg(format!("-{signal}"));
    kill.args(pids.iter().map(u32::to_string));
    let _ = kill.status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "42 (a (weird) name) S 7 42 42 0 -1 4194304 100 0 0 0 150 25 3 2 20 0 1 0";
        assert_eq!(parse_stat(line), Some((7, 150 + 25 + 3 + 2)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_in_its_own_tree_and_has_used_cpu() {
        let me = std::process::id();
        assert_eq!(tree(me)[0], me);
        assert!(peak_rss(&[me]) > 0);
    }
}
