//! Core masks: `0x3`, `[0,2-3]`, `0-1`, `2`; the online CPU check; pinning.

use std::fmt;

/// A set of CPU ids, kept sorted and unique.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet(Vec<usize>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuSetError {
    #[error("core mask {0:?} is empty")]
    Empty(String),
    #[error("core mask {0:?} is not a hex mask (0x..) or a list like [0,2-3]")]
    Syntax(String),
    #[error("core mask names CPU {cpu}, which is not online (online: {online})")]
    Offline { cpu: usize, online: String },
}

/// CPU ids above this are rejected before any allocation: a typo must not allocate gigabytes.
const MAX_CPU: usize = 4096;

impl CpuSet {
    pub fn parse(text: &str) -> Result<Self, CpuSetError> {
        let t = text.trim();
        let syntax = || CpuSetError::Syntax(text.to_string());
        let mut cpus = Vec::new();
        if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            if hex.is_empty() || hex.len() > MAX_CPU / 4 {
                return Err(syntax());
            }
            // Walk nibbles from the least significant end so masks wider than u128 work too.
            for (i, c) in hex.chars().rev().enumerate() {
                let nibble = c.to_digit(16).ok_or_else(syntax)? as usize;
                for bit in 0..4 {
                    if nibble & (1 << bit) != 0 {
                        cpus.push(i * 4 + bit);
                    }
                }
            }
        } else {
            let list = t.strip_prefix('[').map_or(Some(t), |r| r.strip_suffix(']'));
            let list = list.ok_or_else(syntax)?;
            for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (lo, hi) = match part.split_once('-') {
                    Some((a, b)) => (a.trim(), b.trim()),
                    None => (part, part),
                };
                let lo: usize = lo.parse().map_err(|_| syntax())?;
                let hi: usize = hi.parse().map_err(|_| syntax())?;
                if lo > hi || hi >= MAX_CPU {
                    return Err(syntax());
                }
                cpus.extend(lo..=hi);
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.is_empty() {
            return Err(CpuSetError::Empty(text.to_string()));
        }
        Ok(CpuSet(cpus))
    }

    pub fn single(cpu: usize) -> Self {
        CpuSet(vec![cpu])
    }

    /// Fails with the first CPU of the set that is not in `online`.
    pub fn check_online(&self, online: &CpuSet) -> Result<(), CpuSetError> {
        match self.0.iter().find(|c| !online.0.contains(c)) {
            Some(&cpu) => Err(CpuSetError::Offline {
                cpu,
                online: online.to_string(),
            }),
            None => Ok(()),
        }
    }

    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    pub fn contains(&self, cpu: usize) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }

    pub fn is_subset_of(&self, other: &CpuSet) -> bool {
        self.0.iter().all(|c| other.contains(*c))
    }
}

impl fmt::Display for CpuSet {
    /// Prints the list form with ranges folded: `[0,2-3]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end += 1;
            }
            if start != self.0[0] {
                write!(f, ",")?;
            }
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        write!(f, "]")
    }
}

/// The CPUs this process may run on (its affinity mask), which is what "online" means for
/// placement: a CPU outside it cannot host a pinned reactor.
pub fn online_cpus() -> CpuSet {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set` exactly.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if rc != 0 {
        return CpuSet((0..n).collect());
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE, the bound CPU_ISSET requires.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect();
    if cpus.is_empty() {
        CpuSet((0..n).collect())
    } else {
        CpuSet(cpus)
    }
}

/// Pins the calling thread to one CPU. Returns false when the kernel refused.
pub fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_lists() {
        assert_eq!(CpuSet::parse("0x3").unwrap().cpus(), &[0, 1]);
        assert_eq!(CpuSet::parse("0x10").unwrap().cpus(), &[4]);
        assert_eq!(CpuSet::parse("[0,2-3]").unwrap().cpus(), &[0, 2, 3]);
        assert_eq!(CpuSet::parse("0-1").unwrap().cpus(), &[0, 1]);
        assert_eq!(CpuSet::parse("5").unwrap().cpus(), &[5]);
        assert_eq!(CpuSet::parse("[3,1,1]").unwrap().cpus(), &[1, 3]);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(CpuSet::parse("0x"), Err(CpuSetError::Syntax(_))));
        assert!(matches!(CpuSet::parse("0xz"), Err(CpuSetError::Syntax(_))));
        assert!(matches!(
            CpuSet::parse("[3-1]"),
            Err(CpuSetError::Syntax(_))
        ));
        assert!(matches!(CpuSet::parse("[0,2"), Err(CpuSetError::Syntax(_))));
        assert!(matches!(CpuSet::parse("0x0"), Err(CpuSetError::Empty(_))));
        assert!(matches!(CpuSet::parse("[]"), Err(CpuSetError::Empty(_))));
        assert!(matches!(
            CpuSet::parse("99999999"),
            Err(CpuSetError::Syntax(_))
        ));
    }

    #[test]
    fn display_folds_ranges() {
        assert_eq!(CpuSet::parse("0xd").unwrap().to_string(), "[0,2-3]");
        assert_eq!(CpuSet::parse("7").unwrap().to_string(), "[7]");
    }

    #[test]
    fn offline_cpu_is_named() {
        let online = CpuSet::parse("0-1").unwrap();
        let err = CpuSet::parse("0x4")
            .unwrap()
            .check_online(&online)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "core mask names CPU 2, which is not online (online: [0-1])"
        );
    }
}
