//! CSV input: a streaming reader with a length cap per record and per field
//! (a file with no newline cannot make dagrun read it whole), the header
//! checked before any row.
//!
//! Rules: an error names the file, the data row and the line; a record over
//! [`MAX_CSV_RECORD_BYTES`] or a field over [`MAX_CSV_FIELD_BYTES`] is an
//! error, never a truncation.

use super::*;

/// Longest CSV record (line) accepted, in bytes; checked while reading, so a
/// file without line breaks never fills memory.
pub const MAX_CSV_RECORD_BYTES: u64 = 1 << 20;

/// Longest CSV field accepted, in bytes.
pub const MAX_CSV_FIELD_BYTES: usize = 64 << 10;

/// A reader that fails once more than [`MAX_CSV_RECORD_BYTES`] (plus the csv
/// reader's buffer) are read without a record ending: the source moves
/// `mark` to `read` after every record.
pub(super) struct Capped {
    /// The first bytes (read ahead to see the line ends), then the rest of the file.
    pub(super) inner: std::io::Chain<std::io::Cursor<Vec<u8>>, File>,
    pub(super) read: u64,
    pub(super) mark: u64,
}

/// The csv reader's buffer (its reads are at most this long).
pub(super) const CSV_BUFFER: usize = 64 << 10;

impl std::io::Read for Capped {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read.saturating_sub(self.mark) > MAX_CSV_RECORD_BYTES + CSV_BUFFER as u64 {
            return Err(std::io::Error::other(format!(
                "a row is longer than {MAX_CSV_RECORD_BYTES} bytes (1 MiB), the most a CSV row may be; is this a CSV file with one row per line?"
            )));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl CsvSource {
    /// A record ended: the next one may again be [`MAX_CSV_RECORD_BYTES`] long.
    pub(super) fn record_done(&mut self) {
        let r = self.rdr.get_ref().read;
        self.rdr.get_mut().mark = r;
    }
}

pub(super) struct CsvSource {
    pub(super) rdr: csv::Reader<Capped>,
    /// Index in the record of each raw_schema(true) column (Converted may be absent).
    pub(super) idx: [Option<usize>; 7],
    pub(super) width: usize,
    pub(super) rec: csv::ByteRecord,
    pub(super) row: u64,
    /// Added to the csv crate's line of a data record (see [`crlf_line_shift`]).
    pub(super) line_shift: u64,
    /// The file, re-read only to count the exact line of a failing record.
    pub(super) path: std::path::PathBuf,
    /// The record being checked: (data row, line as shown, byte offset).
    pub(super) place: Option<(u64, u64, u64)>,
}

/// 1 when the text's first line ends in CRLF, else 0. The csv crate gives a
/// record that follows a CRLF-terminated one the line of that record (the
/// `\n` is consumed only as the next record starts), so in a CRLF file
/// (Excel's, Windows') every data row's line is one short: this shift puts
/// it right for files with one kind of line end throughout. A file that
/// mixes them gets its failing record's line counted exactly instead
/// ([`line_at`]), only when an error names it.
pub fn crlf_line_shift(head: &[u8]) -> u64 {
    match memchr::memchr(b'\n', head) {
        Some(i) if i > 0 && head[i - 1] == b'\r' => 1,
        _ => 0,
    }
}

impl CsvSource {
    pub(super) fn open(path: &Path, opts: &IngestOptions) -> Result<(Self, bool)> {
        let mut file = open_input(path)?;
        let fname = path.display().to_string();
        // Read ahead (no seek) to see the line ends.
        let mut head = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, CSV_BUFFER as u64), &mut head).with_context(|| format!("cannot read {fname}"))?;
        let line_shift = crlf_line_shift(&head);
        let capped = Capped { inner: std::io::Read::chain(std::io::Cursor::new(head), file), read: 0, mark: 0 };
        let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(true).buffer_capacity(CSV_BUFFER).from_reader(capped);
        let header = rdr.byte_headers().map_err(|e| csv_err(&fname, e, None))?.clone();
        if let Some(i) = header.iter().position(|h| h.len() > MAX_CSV_FIELD_BYTES) {
            bail!("{fname}: line 1 (header), column {}: a column name of {} bytes; a field may be at most {MAX_CSV_FIELD_BYTES} bytes", i + 1, header[i].len());
        }
        if header.is_empty() || (header.len() == 1 && header[0].is_empty()) {
            bail!("{fname} is empty (no header line); a CSV file needs a header line naming the columns and at least one data row");
        }
        let mut names = Vec::with_capacity(header.len());
        for (i, h) in header.iter().enumerate() {
            let h = if i == 0 { h.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(h) } else { h };
            let s = std::str::from_utf8(h).map_err(|_| anyhow!("{fname}: line 1 (header), column {}: not valid UTF-8; save the file as UTF-8", i + 1))?;
            names.push(s.to_string());
        }
        let has_label = check_columns(&fname, &names, opts)?;
        let mut idx = [None; 7];
        for (k, f) in raw_schema(true).fields().iter().enumerate() {
            idx[k] = names.iter().position(|n| n == f.name());
        }
        let mut src = CsvSource { rdr, idx, width: names.len(), rec: csv::ByteRecord::new(), row: 0, line_shift, path: path.to_path_buf(), place: None };
        src.record_done();
        Ok((src, has_label))
    }

    /// The next batch of checked rows. An error names the failing record's
    /// exact line, whatever mix of line ends the file has.
    pub(super) fn next_batch(&mut self, ck: &mut Checker, schema: &SchemaRef, batch_size: usize) -> Result<Option<RecordBatch>> {
        self.place = None;
        self.read_batch(ck, schema, batch_size).map_err(|e| self.with_exact_line(e))
    }

    /// `e` with the line of [`CsvSource::place`] counted in the file itself
    /// (the csv crate's count is one short after a CRLF-terminated record:
    /// exact for a file with one kind of line end, not for a mix). Only a
    /// regular file is read again; anything else keeps the shown line.
    fn with_exact_line(&self, e: anyhow::Error) -> anyhow::Error {
        let Some((row, shown, byte)) = self.place else { return e };
        let regular = std::fs::metadata(&self.path).is_ok_and(|m| m.is_file());
        let Some(exact) = regular.then(|| line_at(&self.path, byte).ok()).flatten() else { return e };
        let msg = format!("{e:#}");
        let (was, is) = (format!("row {row} (line {shown})"), format!("row {row} (line {exact})"));
        if exact == shown || !msg.contains(&was) {
            return e;
        }
        anyhow!("{}", msg.replacen(&was, &is, 1))
    }

    fn read_batch(&mut self, ck: &mut Checker, schema: &SchemaRef, batch_size: usize) -> Result<Option<RecordBatch>> {
        let has_label = self.idx[6].is_some();
        let mut tenants = StringBuilder::with_capacity(batch_size.min(1 << 16), 1024);
        let mut sens = StringBuilder::with_capacity(batch_size.min(1 << 16), 1024);
        let (mut cid, mut login, mut amt, mut date, mut label) = (vec![], vec![], vec![], vec![], vec![]);
        while cid.len() < batch_size {
            let more = self.rdr.read_byte_record(&mut self.rec).map_err(|e| {
                self.place = e.position().map(|p| (self.row + 1, p.line() + self.line_shift, p.byte()));
                csv_err(&ck.file, e, Some((self.row + 1, self.line_shift)))
            })?;
            if !more {
                break;
            }
            self.record_done();
            self.row += 1;
            let row = self.row;
            self.place = self.rec.position().map(|p| (row, p.line() + self.line_shift, p.byte()));
            let line = self.place.map(|(_, l, _)| l);
            if let Some(j) = self.rec.iter().position(|f| f.len() > MAX_CSV_FIELD_BYTES) {
                let name = self.idx.iter().position(|&x| x == Some(j)).map(|k| raw_schema(true).field(k).name().clone());
                bail!(
                    "{}: row {row}{}, column {}{}: a value of {} bytes; a field may be at most {MAX_CSV_FIELD_BYTES} bytes (64 KiB): check the quoting",
                    ck.file,
                    line.map(|l| format!(" (line {l})")).unwrap_or_default(),
                    j + 1,
                    name.map(|n| format!(" ({n})")).unwrap_or_default(),
                    self.rec[j].len()
                );
            }
            if self.rec.len() != self.width {
                bail!(
                    "{}: row {row}{}: has {} but the header has {}; quote fields that contain commas, and give every row one value per column",
                    ck.file,
                    line.map(|l| format!(" (line {l})")).unwrap_or_default(),
                    crate::util::count(self.rec.len(), "field", "fields"),
                    self.width
                );
            }
            let rec = &self.rec;
            let field = |k: usize, name: &str| -> Result<&str> {
                let raw = &rec[self.idx[k].unwrap_or(0)];
                let s = std::str::from_utf8(raw).map_err(|_| anyhow!("{}: not valid UTF-8; save the file as UTF-8", ck.at(row, line, name)))?;
                if s.is_empty() {
                    bail!("{}: empty value (nulls are not allowed); fill in every cell", ck.at(row, line, name));
                }
                Ok(s)
            };
            let t = field(0, TENANT_ID)?;
            let c = parse_customer_id(field(1, CUSTOMER_ID)?, || ck.at(row, line, CUSTOMER_ID))?;
            let s = field(2, SENSITIVE_DATA)?;
            let l = parse_login_count(field(3, LOGIN_COUNT)?, || ck.at(row, line, LOGIN_COUNT))?;
            let a = parse_purchase_amount(field(4, PURCHASE_AMOUNT)?, || ck.at(row, line, PURCHASE_AMOUNT))?;
            let d = parse_visit_date(field(5, LAST_VISIT_DATE)?, || ck.at(row, line, LAST_VISIT_DATE))?;
            let y = if has_label {
                let v = field(6, CONVERTED)?.trim();
                Some(match v.to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => bail!("{}: not a boolean; write true/false or 1/0", ck.at(row, line, CONVERTED)),
                })
            } else {
                None
            };
            ck.row(row, line, t, c, Some(s), l, a, d, y)?;
            tenants.append_value(t);
            sens.append_value(s);
            cid.push(c);
            login.push(l);
            amt.push(a);
            date.push(d);
            if let Some(y) = y {
                label.push(y);
            }
        }
        if cid.is_empty() {
            return Ok(None);
        }
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(tenants.finish()),
            Arc::new(Int64Array::from(cid)),
            Arc::new(sens.finish()),
            Arc::new(Int64Array::from(login)),
            Arc::new(Float64Array::from(amt)),
            Arc::new(Date32Array::from(date)),
        ];
        if has_label {
            cols.push(Arc::new(BooleanArray::from(label)));
        }
        Ok(Some(RecordBatch::try_new(schema.clone(), cols)?))
    }
}

/// A csv error as a message that never contains field contents; `row` is the
/// data row and its line shift ([`crlf_line_shift`]), `None` for the header.
pub(super) fn csv_err(file: &str, e: csv::Error, row: Option<(u64, u64)>) -> anyhow::Error {
    let shift = row.map_or(0, |(_, s)| s);
    let line = e.position().map(|p| format!(" (line {})", p.line() + shift)).unwrap_or_default();
    let row = row.map(|(r, _)| format!(": row {r}")).unwrap_or_default();
    match e.kind() {
        csv::ErrorKind::Io(io) => anyhow!("cannot read {file}{row}{line}: {io}"),
        csv::ErrorKind::Utf8 { .. } => anyhow!("{file}{row}{line}: not valid UTF-8; save the file as UTF-8"),
        _ => anyhow!("{file}{row}{line}: malformed CSV; check quoting and that every row has one value per column"),
    }
}

/// The 1-based line of the record the csv crate places at byte `byte` of
/// `path`: one more than the line ends before it, where `\r\n`, `\n` and a
/// lone `\r` each end a line (the csv crate's record terminators). A record
/// placed on the `\n` of a `\r\n` starts after it (that is where the
/// crate's count falls short).
pub fn line_at(path: &Path, byte: u64) -> std::io::Result<u64> {
    use std::io::Read;
    let mut f = crate::util::open_nonblocking(path)?;
    let mut buf = vec![0u8; 64 << 10];
    let (mut pos, mut ends, mut prev_cr) = (0u64, 0u64, false);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            // Past the end: a trailing lone `\r` ended a line.
            return Ok(1 + ends + u64::from(prev_cr));
        }
        for &b in &buf[..n] {
            if pos == byte {
                // The record's first byte: a `\n` right after a `\r` still ends the line before it.
                let ended_here = b == b'\n' && prev_cr;
                return Ok(1 + ends + u64::from(ended_here || (prev_cr && b != b'\n')));
            }
            match b {
                b'\n' => ends += 1,
                _ if prev_cr => ends += 1,
                _ => {}
            }
            prev_cr = b == b'\r';
            pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_of_a_record_in_any_mix_of_line_ends() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.csv");
        // Lines: 1 "h\r\n", 2 "a\n", 3 "b\r\n", 4 "c\r", 5 "d\n", 6 "e".
        std::fs::write(&p, b"h\r\na\nb\r\nc\rd\ne").unwrap();
        let at = |b: u64| super::line_at(&p, b).unwrap();
        assert_eq!(at(0), 1);
        // The csv crate places a record after a CRLF on its `\n`.
        assert_eq!(at(2), 2);
        assert_eq!(at(3), 2);
        assert_eq!(at(5), 3);
        assert_eq!(at(7), 4);
        assert_eq!(at(8), 4);
        assert_eq!(at(10), 5);
        assert_eq!(at(12), 6);
        assert_eq!(at(99), 6);
    }

    #[test]
    fn crlf_files_shift_data_lines_by_one() {
        assert_eq!(super::crlf_line_shift(b"a,b\r\n1,2\r\n"), 1);
        assert_eq!(super::crlf_line_shift(b"a,b\n1,2\n"), 0);
        assert_eq!(super::crlf_line_shift(b"a,b"), 0);
        assert_eq!(super::crlf_line_shift(b"\n"), 0);
    }
}
