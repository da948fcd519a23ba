//! Small helpers shared by every module.
pub mod alloc;
pub mod atomic;
pub mod capture;
pub mod child_env;
pub mod flock;
pub mod interrupt;
pub mod nofollow;
pub mod par;
pub mod prometheus;
pub mod redact;
pub mod spawn;
pub mod stdout;

/// Is the `/`-separated path `inner` strictly below the folder `outer`
/// (`out/a.txt` is below `out`; `out-x` and `out` itself are not)?
pub fn path_within(inner: &str, outer: &str) -> bool {
    inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'))
}

/// `s` is exactly `n` lowercase hex digits (an id, a mark, a digest read
/// back from disk; a blake3 content hash is `workspace::ContentHash`).
pub fn is_lower_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Remove a file, symlink (never its target) or directory tree if present.
pub fn fs_remove(p: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).with_context(|| format!("cannot remove {}", p.display())),
        Ok(_) => std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display())),
        Err(_) => Ok(()),
    }
}

/// The bytes of `path`, but at most `max + 1` of them: a caller that gets
/// more than `max` knows the file is too large without having read all of
/// it (a FIFO, `/dev/zero` or a growing file has no size to check first).
/// Opened with `O_NONBLOCK`: a FIFO put where a file should be reads as
/// what its writer has sent so far (nothing, without one) instead of
/// blocking the run, which may hold the workspace lock, forever.
pub fn read_at_most(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    read_open_at_most(&open_nonblocking(path)?, max)
}

/// [`read_at_most`] of a file already opened with `O_NONBLOCK`.
fn read_open_at_most(f: &std::fs::File, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    // Room for the whole file up front (one read, as `fs::read` does; `Take`
    // hides the size from `read_to_end`), within the cap.
    let size = f.metadata().map(|m| m.len()).unwrap_or(0).min(max);
    bytes.reserve_exact(size.saturating_add(1) as usize);
    match f.take(max.saturating_add(1)).read_to_end(&mut bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(bytes),
        r => r.map(|_| bytes),
    }
}

/// The largest index at most `max` that is a character boundary of `s`
/// (where `s` may be cut without splitting a character); `str::floor_char_boundary`
/// once the MSRV allows it.
pub fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// True when `text` is a label fit to show in a terminal and a log line: at
/// most `max` bytes and no control character (no line break, no escape
/// sequence). Token names and promotion reasons are held to it.
pub fn is_plain_label(text: &str, max: usize) -> bool {
    text.len() <= max && !text.chars().any(char::is_control)
}

/// `path` opened for reading as a regular file (a link to one is fine): a
/// FIFO or a device put in its place is refused at once (`InvalidData`),
/// never waited on nor read without end. For data files dagrun streams
/// (Parquet it wrote, a reference model's features), not ones it reads whole.
pub fn open_regular(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let f = open_nonblocking(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
    }
    Ok(f)
}

/// `path` opened for reading with `O_NONBLOCK`: a FIFO put where a file
/// should be is never waited on (see [`read_at_most`]).
pub fn open_nonblocking(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

/// A file dagrun reads back (state, memo, spool, run records, the audit
/// head…): a regular file (a link to one is fine) of at most `max` bytes,
/// else an `InvalidData` error saying so: a FIFO or a device in its place
/// (a link to `/dev/zero`) is refused before a byte is read, never waited on
/// nor read into memory.
pub fn read_capped(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    read_capped_from(&open_regular(path)?, max)
}

/// [`read_capped`] of a file already opened with [`open_regular`] (one the
/// caller keeps, e.g. to hold a lock on it while it reads).
pub fn read_capped_from(f: &std::fs::File, max: u64) -> std::io::Result<Vec<u8>> {
    let bytes = read_open_at_most(f, max)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {max} bytes: not a file dagrun wrote")));
    }
    Ok(bytes)
}

/// `text` with its control characters escaped (`\u{1b}`), tabs kept: for
/// printing what dagrun did not write itself (a command's stderr in a run
/// record, a server's error message), so that it is shown, never obeyed by
/// the terminal.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_control() && c != '\t';
    if text.chars().any(escaped) {
        text.chars().map(|c| if escaped(c) { c.escape_default().to_string() } else { c.to_string() }).collect::<String>().into()
    } else {
        text.into()
    }
}

/// [`escape_controls`] line by line: line breaks kept, every other control
/// character escaped. For messages of several lines that may quote what
/// dagrun did not write (a file name, a record's field): the top-level error
/// printer, a verify problem.
pub fn escape_controls_in_lines(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(|c| c.is_control() && c != '\t' && c != '\n') {
        text.split('\n').map(escape_controls).collect::<Vec<_>>().join("\n").into()
    } else {
        text.into()
    }
}

/// `n` and the noun for it: `1 stage`, `2 stages` (`plural` is the noun's
/// plural form).
pub fn count(n: usize, one: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { plural })
}

/// A float as a message shows it: at most 6 decimals, trailing zeros cut
/// (`0.8999999999999999` is `0.9`, a sum of shares as the user wrote them).
pub fn short_float(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { &s };
    if s == "-0" { "0".into() } else { s.to_string() }
}

/// 1234567 → "1.2 MiB".
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", units[u]) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_float_cuts_float_noise() {
        assert_eq!(super::short_float(0.3 + 0.3 + 0.3), "0.9");
        assert_eq!(super::short_float(0.8), "0.8");
        assert_eq!(super::short_float(2.0), "2");
        assert_eq!(super::short_float(1.25e-7), "0");
    }

    #[test]
    fn lines_are_kept_and_other_controls_escaped() {
        assert_eq!(super::escape_controls_in_lines("one\ntwo\tthree"), "one\ntwo\tthree");
        assert_eq!(super::escape_controls_in_lines("a\u{1b}]0;x\u{7}\nb\rc"), "a\\u{1b}]0;x\\u{7}\nb\\rc");
    }

    #[test]
    fn read_capped_refuses_a_device_or_a_fifo_before_reading() {
        let e = super::read_capped(std::path::Path::new("/dev/zero"), 1 << 30).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(super::read_capped(&fifo, 100).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(super::open_regular(&fifo).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(super::open_regular(std::path::Path::new("/dev/zero")).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        let file = dir.path().join("f");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(super::read_capped(&file, 5).unwrap(), b"12345");
        assert!(super::open_regular(&file).is_ok());
        assert!(super::read_capped(&file, 4).is_err());
    }

    #[test]
    fn control_characters_are_escaped_tabs_kept() {
        assert_eq!(super::escape_controls("plain\ttext"), "plain\ttext");
        assert_eq!(super::escape_controls("\u{1b}[31mred\u{1b}[0m \u{7}"), "\\u{1b}[31mred\\u{1b}[0m \\u{7}");
    }
}
