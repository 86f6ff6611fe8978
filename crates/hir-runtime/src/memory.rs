//! This process's memory as the kernel counts it (Linux `/proc/self/status`): resident
//! set size now and at its peak, and a reset of the peak, so a phase of work can report
//! the most memory it held. Other systems report nothing (`None`).

use std::fs;

/// Resident set size now and at its peak since start or the last [`reset_peak`], bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`.
    pub now: u64,
    /// `VmHWM`.
    pub peak: u64,
}

impl Rss {
    /// Reads both figures; `None` where `/proc/self/status` is missing or lacks them.
    pub fn read() -> Option<Self> {
        parse(&fs::read_to_string("/proc/self/status").ok()?)
    }
}

/// Starts a new peak at the current resident size (`/proc/self/clear_refs`, value 5);
/// whether the kernel accepted it.
pub fn reset_peak() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn parse(status: &str) -> Option<Rss> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some(Rss {
        now: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// Hands memory the allocator holds but no longer uses back to the system.
///
/// glibc's allocator keeps freed memory in per-thread arenas for reuse: the generator's
/// KV caches, freed on its engine thread when sampling ends, would otherwise stay
/// resident while the trainer's thread allocates its own. Called when a phase of work
/// ends (an idle engine, a finished optimizer step); a no-op on other C libraries.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps to the
    // system; it takes no pointers and is thread-safe.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes as mebibytes, for logs and tables.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_resident_and_peak_lines() {
        let status = "Name:\thir\nVmPeak:\t 9999 kB\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\n";
        assert_eq!(
            parse(status),
            Some(Rss {
                now: 1024 * 1024,
                peak: 2048 * 1024
            })
        );
        assert_eq!(parse("VmRSS:\t12 kB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_allocation_raises_the_peak_and_a_reset_lowers_it() {
        let before = Rss::read().expect("linux reports memory");
        let block = vec![1u8; 64 << 20];
        let during = Rss::read().unwrap();
        assert!(
            during.peak >= before.now + (60 << 20),
            "{before:?} {during:?}"
        );
        drop(std::hint::black_box(block));
        if reset_peak() {
            let after = Rss::read().unwrap();
            assert!(after.peak < during.peak, "{during:?} {after:?}");
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_heap_memory_is_handed_back() {
        // 64 KiB blocks come from the heap, not from their own mappings; keeping every
        // tenth pins the heap, so freeing the others returns nothing by itself.
        let blocks: Vec<Vec<u8>> = (0..2000).map(|i| vec![i as u8 | 1; 64 << 10]).collect();
        let kept: Vec<Vec<u8>> = blocks
            .into_iter()
            .enumerate()
            .filter_map(|(i, b)| (i % 10 == 0).then_some(b))
            .collect();
        let before = Rss::read().unwrap().now;
        release_free();
        let after = Rss::read().unwrap().now;
        assert!(
            after + (50 << 20) < before,
            "{} MiB before, {} MiB after",
            mib(before),
            mib(after)
        );
        assert_eq!(std::hint::black_box(kept).len(), 200);
    }
}
