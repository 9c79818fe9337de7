//! Giving back the code pages the agent no longer runs.
//!
//! The agent's own memory (heap, stacks, buffers) is about 1.3 MiB; most of its resident set is
//! code: the pages of its binary and of libc that the kernel mapped the first time they ran (and
//! their neighbours, mapped with them) and keeps mapped for as long as the process lives. Much of
//! that code ran once (argument and config parsing, TLS and store setup, the first registration)
//! or runs only during a change. So now and then the agent asks the kernel to drop the page-table
//! entries of its code and read-only data (`madvise(MADV_DONTNEED)`): the pages it still runs come
//! back at their next use as minor faults from the page cache (from disk only if the kernel
//! reclaimed them meanwhile), and the ones it stopped running leave its RSS. Nothing is lost: the
//! pages stay in the page cache, where, unmapped, they are the first the kernel reclaims when
//! memory is short.
//!
//! What is released comes from the dynamic loader's own list of loaded objects
//! (`dl_iterate_phdr`), walked with the loader's lock held, so no object can be unloaded or
//! replaced meanwhile: each object's loadable segments that are not writable, less its RELRO
//! range (written by the loader's relocations) and less any mapping that holds private pages
//! (copied on write, or swapped out: a debugger's breakpoints, say), whole pages only.

use std::ops::Range;
use std::time::Duration;

use tracing::{debug, info};

/// When the first release happens: after startup, the first registration and a few reports.
pub const FIRST_RELEASE_AFTER: Duration = Duration::from_secs(20);

/// Address ranges whose pages are private to the process (anonymous copies, or swapped out),
/// from `/proc/self/smaps` text: dropping them would lose data. A mapping whose figures are
/// missing counts as private.
fn private_ranges(smaps: &str) -> Vec<Range<usize>> {
    let mut private = Vec::new();
    let mut current: Option<(Range<usize>, Option<u64>, Option<u64>)> = None;
    let mut finish = |mapping: Option<(Range<usize>, Option<u64>, Option<u64>)>| {
        if let Some((range, anonymous, swap)) = mapping
            && (anonymous != Some(0) || swap != Some(0))
        {
            private.push(range);
        }
    };
    for line in smaps.lines() {
        if let Some(range) = mapping_range(line) {
            finish(current.take());
            current = Some((range, None, None));
        } else if let Some((_, anonymous, swap)) = current.as_mut() {
            if let Some(value) = line.strip_prefix("Anonymous:") {
                *anonymous = kib(value);
            } else if let Some(value) = line.strip_prefix("Swap:") {
                *swap = kib(value);
            }
        }
    }
    finish(current);
    private
}

/// The range of a mapping's header line (`start-end perms offset dev inode path`).
fn mapping_range(line: &str) -> Option<Range<usize>> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    // Field lines ("Rss:   4 kB") have no hex range; a header has permissions next.
    let perms = fields.next()?;
    (end > start && perms.len() == 4).then_some(start..end)
}

/// `   1234 kB` as 1234.
fn kib(value: &str) -> Option<u64> {
    value.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// One loaded object's program headers, as the loader reports them.
struct Segment {
    kind: u32,
    flags: u32,
    /// Absolute addresses (load bias added).
    range: Range<usize>,
}

/// The whole pages of `segments` that may be released: those of loadable, not writable
/// segments, outside the RELRO range and outside every `private` range.
fn releasable(segments: &[Segment], private: &[Range<usize>], page: usize) -> Vec<Range<usize>> {
    let relro: Vec<&Range<usize>> = segments
        .iter()
        .filter(|segment| segment.kind == libc::PT_GNU_RELRO)
        .map(|segment| &segment.range)
        .collect();
    let mut pages = Vec::new();
    for segment in segments {
        if segment.kind != libc::PT_LOAD || segment.flags & libc::PF_W != 0 {
            continue;
        }
        // Whole pages only: a page shared with a neighbouring segment stays.
        let start = segment.range.start.div_ceil(page) * page;
        let end = segment.range.end / page * page;
        let mut pieces: Vec<Range<usize>> = std::iter::once(start..end).collect();
        for hole in relro.iter().copied().chain(private) {
            pieces = pieces
                .into_iter()
                .flat_map(|piece| without(piece, hole, page))
                .collect();
        }
        pages.extend(pieces.into_iter().filter(|piece| piece.start < piece.end));
    }
    pages
}

/// `piece` less `hole` (widened to whole pages): up to two pieces.
fn without(piece: Range<usize>, hole: &Range<usize>, page: usize) -> Vec<Range<usize>> {
    let hole = hole.start / page * page..hole.end.div_ceil(page) * page;
    if hole.end <= piece.start || piece.end <= hole.start {
        return vec![piece];
    }
    vec![
        piece.start..hole.start.max(piece.start),
        hole.end.min(piece.end)..piece.end,
    ]
}

/// What the loader's walk needs: the private ranges, and what it did.
struct Walk {
    private: Vec<Range<usize>>,
    page: usize,
    released_bytes: usize,
}

/// Called by `dl_iterate_phdr` for each loaded object, with the loader's lock held.
unsafe extern "C" fn release_object(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: dl_iterate_phdr passes a valid info for this call, and `data` is the `Walk` that
    // `release_code_pages` lent it, used by nothing else meanwhile.
    let (info, walk) = unsafe { (&*info, &mut *(data as *mut Walk)) };
    // SAFETY: the name is a NUL-terminated string (empty for the executable) for this call.
    let name = unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes();
    if name.starts_with(b"linux-vdso") || name.starts_with(b"linux-gate") {
        return 0; // the kernel's own page, not a file
    }
    // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
    let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let bias = info.dlpi_addr as usize;
    let segments: Vec<Segment> = headers
        .iter()
        .map(|header| {
            let start = bias + header.p_vaddr as usize;
            Segment {
                kind: header.p_type,
                flags: header.p_flags,
                range: start..start + header.p_memsz as usize,
            }
        })
        .collect();
    for pages in releasable(&segments, &walk.private, walk.page) {
        // SAFETY: whole pages of a loaded object's code or read-only data, holding no private
        // page, in a mapping the loader cannot remove while its lock is held: dropping their
        // page-table entries discards nothing, as each reads back from its file when next used.
        let done = unsafe {
            libc::madvise(
                pages.start as *mut libc::c_void,
                pages.end - pages.start,
                libc::MADV_DONTNEED,
            )
        };
        if done == 0 {
            walk.released_bytes += pages.end - pages.start;
        }
    }
    0
}

/// Drops the page-table entries of the agent's code and read-only data (see the module docs);
/// returns how many bytes of address space were released (resident or not).
pub fn release_code_pages() -> std::io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|page| page.is_power_of_two())
        .unwrap_or(4096);
    let mut walk = Walk {
        private: private_ranges(&smaps),
        page,
        released_bytes: 0,
    };
    // SAFETY: the callback only reads what the loader passes and the `Walk`, which outlives the
    // call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(release_object),
            &mut walk as *mut Walk as *mut libc::c_void,
        );
    }
    Ok(walk.released_bytes)
}

/// Resident pages of mapped files (`RssFile`), in KiB; 0 when unknown.
fn resident_file_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("RssFile:"))
                .and_then(kib)
        })
        .unwrap_or(0)
}

/// Releases code pages [`FIRST_RELEASE_AFTER`] startup and then every `interval`, for ever.
/// The first release is said at info (so an operator can see what it took), later ones at debug.
pub async fn release_code_pages_every(interval: Duration) {
    tokio::time::sleep(FIRST_RELEASE_AFTER).await;
    let mut first = true;
    loop {
        let before_kib = resident_file_kib();
        match release_code_pages() {
            Ok(_) => {
                let after_kib = resident_file_kib();
                if first {
                    info!(before_kib, after_kib, "Released the code pages not in use.");
                } else {
                    debug!(before_kib, after_kib, "Released the code pages not in use.");
                }
            }
            Err(error) => debug!(%error, "Could not read /proc/self/smaps to release code pages."),
        }
        first = false;
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0400000 r--p 00000000 fe:01 123 /usr/bin/rewind agent (deleted)
Size:               4096 kB
Rss:                1452 kB
Anonymous:             0 kB
Swap:                  0 kB
THPeligible:           0
55d0a0a00000-55d0a0a52000 r--p 00a00000 fe:01 123 /usr/bin/rewind-agent
Rss:                 328 kB
Anonymous:             0 kB
Swap:                 12 kB
7f0000400000-7f0000500000 r-xp 00028000 fe:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1104 kB
Anonymous:             4 kB
Swap:                  0 kB
7f0000600000-7f0000700000 r-xp 00000000 fe:01 78 /usr/lib/x86_64-linux-gnu/libm.so.6
Rss:                   0 kB
";

    #[test]
    fn mappings_with_copied_swapped_or_unknown_pages_are_private() {
        assert_eq!(
            private_ranges(SMAPS),
            vec![
                0x55d0a0a00000..0x55d0a0a52000,
                0x7f0000400000..0x7f0000500000,
                0x7f0000600000..0x7f0000700000,
            ]
        );
    }

    #[test]
    fn only_whole_pages_of_read_only_segments_outside_relro_and_private_ranges_are_released() {
        let page = 0x1000;
        let segments = [
            // Headers and read-only data, from an unaligned start.
            Segment {
                kind: libc::PT_LOAD,
                flags: libc::PF_R,
                range: 0x10_0100..0x10_5000,
            },
            // Code, with a private range (a breakpoint's page) inside.
            Segment {
                kind: libc::PT_LOAD,
                flags: libc::PF_R | libc::PF_X,
                range: 0x20_0000..0x28_0000,
            },
            // Writable data, whose start the loader relocates and then protects (RELRO).
            Segment {
                kind: libc::PT_LOAD,
                flags: libc::PF_R | libc::PF_W,
                range: 0x30_0000..0x31_0000,
            },
            Segment {
                kind: libc::PT_GNU_RELRO,
                flags: libc::PF_R,
                range: 0x30_0000..0x30_8000,
            },
            // Read-only data that the RELRO range overlaps (as some linkers lay them out).
            Segment {
                kind: libc::PT_LOAD,
                flags: libc::PF_R,
                range: 0x30_6000..0x30_9000,
            },
        ];
        let breakpoint = 0x24_0010..0x24_0020;
        assert_eq!(
            releasable(&segments, std::slice::from_ref(&breakpoint), page),
            vec![
                0x10_1000..0x10_5000,
                0x20_0000..0x24_0000,
                0x24_1000..0x28_0000,
                0x30_8000..0x30_9000,
            ]
        );
    }

    /// Pointers in a static table: in a position-independent binary the loader writes them at
    /// startup (RELRO), so releasing that range would leave the unrelocated bytes behind.
    static NAMES: [&str; 3] = ["capture", "restore", "verify"];
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    #[test]
    fn after_a_release_code_runs_and_relocated_and_written_data_are_intact() {
        COUNTER.store(41, std::sync::atomic::Ordering::SeqCst);
        let before = resident_file_kib();
        let released = release_code_pages().expect("read /proc/self/smaps");
        let after = resident_file_kib();
        assert!(released > 0, "nothing was released");
        assert!(
            after < before,
            "resident file pages went from {before} KiB to {after} KiB"
        );
        // Relocated pointers, written data, and code read back from the page cache.
        assert_eq!(NAMES.join(","), "capture,restore,verify");
        assert_eq!(
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            41
        );
        let digest = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(b"rewind"))
        };
        assert_eq!(
            digest,
            "c51185739fabdd96636a9025f6f622690e42e47c7166bdcb6b479f48e80a6202"
        );
        assert!(release_code_pages().is_ok());
    }
}
