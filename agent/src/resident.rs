//! Giving back the code pages the agent no longer runs.
//!
//! The agent's own memory (heap, stacks, buffers) is about 1.3 MiB; most of its resident set is
//! code: the pages of its binary and of libc that the kernel mapped the first time they ran (and
//! their neighbours, mapped with them) and keeps mapped for as long as the process lives. Much of
//! that code ran once (argument and config parsing, TLS and store setup, the first registration)
//! or runs only during a change. So now and then the agent asks the kernel to drop the page-table
//! entries of its read-only file mappings (`madvise(MADV_DONTNEED)`): the pages it still runs come
//! back at their next use as minor faults served from the page cache, never from disk, and the
//! ones it stopped running leave its RSS. Nothing is lost: the pages stay in the page cache, where,
//! unmapped, they are the first the kernel reclaims when memory is short.
//!
//! Only mappings that are private, not writable, backed by a file and hold no anonymous
//! (copied-on-write) page are touched, so the dynamic loader's relocated pages and a debugger's
//! breakpoints are left alone.

use std::time::Duration;

use tracing::debug;

/// When the first release happens: after startup, the first registration and a few reports.
pub const FIRST_RELEASE_AFTER: Duration = Duration::from_secs(20);

/// A mapping whose page-table entries can be dropped without losing anything.
#[derive(Debug, PartialEq)]
struct Releasable {
    start: usize,
    len: usize,
    resident_kib: u64,
}

/// The releasable mappings listed in `/proc/self/smaps` text.
fn releasable(smaps: &str) -> Vec<Releasable> {
    struct Mapping {
        start: usize,
        len: usize,
        eligible: bool,
        resident_kib: u64,
        anonymous_kib: Option<u64>,
    }
    let mut found = Vec::new();
    let mut current: Option<Mapping> = None;
    let mut finish = |mapping: Option<Mapping>| {
        if let Some(mapping) = mapping
            && mapping.eligible
            && mapping.anonymous_kib == Some(0)
            && mapping.resident_kib > 0
        {
            found.push(Releasable {
                start: mapping.start,
                len: mapping.len,
                resident_kib: mapping.resident_kib,
            });
        }
    };
    for line in smaps.lines() {
        if let Some((start, end, eligible)) = mapping_header(line) {
            finish(current.take());
            current = Some(Mapping {
                start,
                len: end - start,
                eligible,
                resident_kib: 0,
                anonymous_kib: None,
            });
        } else if let Some(mapping) = current.as_mut() {
            if let Some(value) = line.strip_prefix("Rss:") {
                mapping.resident_kib = kib(value).unwrap_or(0);
            } else if let Some(value) = line.strip_prefix("Anonymous:") {
                mapping.anonymous_kib = kib(value);
            }
        }
    }
    finish(current);
    found
}

/// `start-end perms offset dev inode path`: the range, and whether the mapping is private,
/// read-only and backed by a file.
fn mapping_header(line: &str) -> Option<(usize, usize, bool)> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?.as_bytes();
    if end <= start || perms.len() != 4 {
        return None;
    }
    let path = fields.nth(3).unwrap_or("");
    let eligible =
        perms[0] == b'r' && perms[1] == b'-' && perms[3] == b'p' && path.starts_with('/');
    Some((start, end, eligible))
}

/// `   1234 kB` as 1234.
fn kib(value: &str) -> Option<u64> {
    value.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// Drops the page-table entries of every releasable mapping; returns how many KiB were resident
/// in them before.
pub fn release_code_pages() -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released_kib = 0;
    for mapping in releasable(&smaps) {
        // SAFETY: the range is one whole private, read-only file mapping holding no anonymous
        // page, so dropping its page-table entries discards nothing: each page reads back from
        // the file (through the page cache) when next used. No Rust reference points into it
        // that could observe a difference.
        let result = unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                mapping.len,
                libc::MADV_DONTNEED,
            )
        };
        if result == 0 {
            released_kib += mapping.resident_kib;
        }
    }
    Ok(released_kib)
}

/// Releases code pages [`FIRST_RELEASE_AFTER`] startup and then every `interval`, for ever.
pub async fn release_code_pages_every(interval: Duration) {
    tokio::time::sleep(FIRST_RELEASE_AFTER).await;
    loop {
        match release_code_pages() {
            Ok(released_kib) => debug!(released_kib, "Released code pages."),
            Err(error) => debug!(%error, "Could not read /proc/self/smaps to release code pages."),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0400000 r--p 00000000 fe:01 123 /usr/bin/rewind-agent
Size:               4096 kB
Rss:                1452 kB
Anonymous:             0 kB
55d0a0400000-55d0a0a00000 r-xp 00400000 fe:01 123 /usr/bin/rewind-agent
Size:               6144 kB
Rss:                4848 kB
Anonymous:             0 kB
55d0a0a00000-55d0a0a52000 r--p 00a00000 fe:01 123 /usr/bin/rewind-agent
Size:                328 kB
Rss:                 328 kB
Anonymous:           328 kB
55d0a0a52000-55d0a0a5a000 rw-p 00a52000 fe:01 123 /usr/bin/rewind-agent
Size:                 32 kB
Rss:                  32 kB
Anonymous:            32 kB
7f0000000000-7f0000100000 r-xs 00000000 00:05 9 /dev/shm/shared-code
Size:               1024 kB
Rss:                  64 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 r-xp 00000000 00:00 0 
Size:               1024 kB
Rss:                  12 kB
Anonymous:            12 kB
7f0000300000-7f0000302000 r-xp 00000000 00:00 0 [vdso]
Size:                  8 kB
Rss:                   8 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r-xp 00028000 fe:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1408 kB
Rss:                1104 kB
Anonymous:             4 kB
7f0000600000-7f0000700000 r-xp 00000000 fe:01 78 /usr/lib/x86_64-linux-gnu/libm.so.6
Size:               1024 kB
Rss:                   0 kB
Anonymous:             0 kB
";

    #[test]
    fn only_private_read_only_file_mappings_without_anonymous_pages_are_released() {
        assert_eq!(
            releasable(SMAPS),
            vec![
                Releasable {
                    start: 0x55d0a0000000,
                    len: 0x400000,
                    resident_kib: 1452
                },
                Releasable {
                    start: 0x55d0a0400000,
                    len: 0x600000,
                    resident_kib: 4848
                },
            ],
            "relocated (anonymous) pages, writable, shared, anonymous, kernel-provided and \
             empty mappings, and a library with a breakpoint, are all left alone"
        );
    }

    #[test]
    fn a_mapping_without_an_anonymous_line_is_left_alone() {
        let smaps = "55d0a0000000-55d0a0400000 r-xp 00000000 fe:01 123 /usr/bin/x\nRss: 8 kB\n";
        assert!(releasable(smaps).is_empty());
    }

    fn resident_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("RssFile:"))
            .and_then(kib)
            .expect("RssFile in /proc/self/status")
    }

    #[test]
    fn releasing_shrinks_the_resident_set_and_the_code_keeps_running() {
        let before = resident_file_kib();
        let released = release_code_pages().expect("read /proc/self/smaps");
        let after = resident_file_kib();
        assert!(released > 0, "this test's own code was resident");
        assert!(
            after < before,
            "resident file pages went from {before} KiB to {after} KiB"
        );
        // The code released runs again, its pages read back from the page cache.
        assert_eq!(releasable(SMAPS).len(), 2);
        assert!(release_code_pages().is_ok());
    }
}
