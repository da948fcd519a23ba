//! How deep a Parquet file's schema nests, read from the footer's bytes
//! before the Parquet decoder sees them.
//!
//! Rules:
//! - The decoder builds the schema tree recursively, one stack frame per
//!   level, so a small footer declaring a schema thousands of levels deep
//!   overflows the stack and aborts the whole process (no panic to catch).
//!   [`check_schema_depth`] walks the footer's flat schema list (Thrift
//!   compact protocol: `FileMetaData` field 2, a list of `SchemaElement`
//!   whose field 5 is `num_children`) with an explicit stack and refuses a
//!   schema deeper than the caller's limit.
//! - The walk itself never recurses on the file's nesting beyond
//!   [`MAX_STRUCT_NESTING`] (the Thrift structs of a real footer nest 4
//!   deep) and never reads past the footer: every element consumes at least
//!   one byte, so a huge declared list count ends at the footer's end.
//! - Anything it cannot read is a corrupt footer (the decoder would refuse
//!   it too); it never guesses. Where the decoder is lenient, the walk is
//!   strict, so the two can never disagree on a schema's shape: a child count
//!   must be typed i32, lie in 0..=i32::MAX and appear once per element (the
//!   decoder reads an i64-typed or out-of-range count too, truncated to 32
//!   bits: a count of 1 − 2³² was a leaf to an earlier walk and 1 to the
//!   decoder).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Deepest Thrift struct nesting the walk follows.
const MAX_STRUCT_NESTING: usize = 16;
/// Largest footer read (real ones are a few KiB per row group).
const MAX_FOOTER_BYTES: u64 = 64 << 20;

/// Refuse a file whose schema nests deeper than `max_depth` (the root is
/// level 1, its columns level 2). The error says why, without the file name.
pub fn check_schema_depth(file: &File, file_len: u64, max_depth: usize) -> Result<(), String> {
    let corrupt = |why: &str| format!("not a readable Parquet file (corrupt footer: {why}); write it with a Parquet writer such as pyarrow");
    if file_len < 12 {
        return Err(corrupt("too short"));
    }
    let mut tail = [0u8; 8];
    file.read_exact_at(&mut tail, file_len - 8).map_err(|e| corrupt(&e.to_string()))?;
    if &tail[4..] != b"PAR1" {
        return Err(corrupt("no PAR1 magic at its end (an encrypted footer, PARE, is not supported)"));
    }
    let len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if len > MAX_FOOTER_BYTES || len + 12 > file_len {
        return Err(corrupt(&format!("a footer of {len} bytes")));
    }
    let mut footer = vec![0u8; len as usize];
    file.read_exact_at(&mut footer, file_len - 8 - len).map_err(|e| corrupt(&e.to_string()))?;
    match schema_depth(&footer, max_depth) {
        Ok(_) => Ok(()),
        Err(Walk::TooDeep) => Err(format!(
            "its schema nests more than {max_depth} levels deep; dagrun reads flat tables of the spec's columns: write the columns at the top level"
        )),
        Err(Walk::Corrupt(why)) => Err(corrupt(why)),
    }
}

#[derive(Debug, PartialEq)]
enum Walk {
    TooDeep,
    Corrupt(&'static str),
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, Walk> {
        let v = *self.b.get(self.i).ok_or(Walk::Corrupt("it ends early"))?;
        self.i += 1;
        Ok(v)
    }
    fn skip(&mut self, n: u64) -> Result<(), Walk> {
        let end = (self.i as u64).checked_add(n).filter(|&e| e <= self.b.len() as u64).ok_or(Walk::Corrupt("it ends early"))?;
        self.i = end as usize;
        Ok(())
    }
    fn varint(&mut self) -> Result<u64, Walk> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Walk::Corrupt("a malformed integer"))
    }
    fn zigzag(&mut self) -> Result<i64, Walk> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
    /// A field header: (field id, type), or None at the struct's end.
    fn field(&mut self, last: &mut i64) -> Result<Option<(i64, u8)>, Walk> {
        let h = self.byte()?;
        if h == 0 {
            return Ok(None);
        }
        let delta = i64::from(h >> 4);
        *last = if delta == 0 { self.zigzag()? } else { *last + delta };
        Ok(Some((*last, h & 0x0f)))
    }
    /// A list or set header: (size, element type).
    fn list(&mut self) -> Result<(u64, u8), Walk> {
        let h = self.byte()?;
        let size = if h >> 4 == 15 { self.varint()? } else { u64::from(h >> 4) };
        Ok((size, h & 0x0f))
    }
    /// Skip a value of compact type `t`; `in_container`: a bool is a byte of
    /// its own (in a field header its value is the type itself).
    fn skip_value(&mut self, t: u8, nesting: usize, in_container: bool) -> Result<(), Walk> {
        match t {
            1 | 2 if in_container => self.skip(1),
            1 | 2 => Ok(()),
            3 => self.skip(1),
            4..=6 => self.varint().map(drop),
            7 => self.skip(8),
            8 => {
                let n = self.varint()?;
                self.skip(n)
            }
            9 | 10 => {
                let (size, et) = self.list()?;
                for _ in 0..size {
                    self.skip_value(et, nesting + 1, true)?;
                }
                Ok(())
            }
            11 => {
                let size = self.varint()?;
                if size > 0 {
                    let kv = self.byte()?;
                    for _ in 0..size {
                        self.skip_value(kv >> 4, nesting + 1, true)?;
                        self.skip_value(kv & 0x0f, nesting + 1, true)?;
                    }
                }
                Ok(())
            }
            12 => self.skip_struct(nesting + 1),
            13 => self.skip(16), // uuid
            _ => Err(Walk::Corrupt("an unknown Thrift type")),
        }
    }
    fn skip_struct(&mut self, nesting: usize) -> Result<(), Walk> {
        if nesting > MAX_STRUCT_NESTING {
            return Err(Walk::Corrupt("Thrift structs nested too deep"));
        }
        let mut last = 0;
        while let Some((_, t)) = self.field(&mut last)? {
            self.skip_value(t, nesting, false)?;
        }
        Ok(())
    }
}

/// The schema's depth, walking `FileMetaData` up to its schema list.
fn schema_depth(footer: &[u8], max_depth: usize) -> Result<usize, Walk> {
    let mut r = Reader { b: footer, i: 0 };
    let mut last = 0;
    while let Some((id, t)) = r.field(&mut last)? {
        if id != 2 {
            r.skip_value(t, 1, false)?;
            continue;
        }
        if t != 9 {
            return Err(Walk::Corrupt("the schema is not a list"));
        }
        let (size, et) = r.list()?;
        if et != 12 {
            return Err(Walk::Corrupt("the schema's elements are not structs"));
        }
        // Remaining children of each open group, outermost first.
        let mut open: Vec<u64> = Vec::new();
        let mut deepest = 0;
        for _ in 0..size {
            let mut children: Option<i64> = None;
            let mut f = 0;
            while let Some((fid, ft)) = r.field(&mut f)? {
                if fid != 5 {
                    r.skip_value(ft, 2, false)?;
                    continue;
                }
                if ft != 5 || children.is_some() {
                    return Err(Walk::Corrupt("a schema element's child count is not one i32"));
                }
                let n = r.zigzag()?;
                if !(0..=i64::from(i32::MAX)).contains(&n) {
                    return Err(Walk::Corrupt("a schema element's child count is out of range"));
                }
                children = Some(n);
            }
            let children = children.unwrap_or(0);
            let depth = open.len() + 1;
            if depth > max_depth {
                return Err(Walk::TooDeep);
            }
            deepest = deepest.max(depth);
            if let Some(parent) = open.last_mut() {
                *parent -= 1;
            }
            if children > 0 {
                open.push(children as u64);
            }
            while open.last() == Some(&0) {
                open.pop();
            }
        }
        return Ok(deepest);
    }
    Err(Walk::Corrupt("it has no schema"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A footer (Thrift compact) with a schema nested `depth` groups deep, as
    /// the attack that overflowed the decoder's stack wrote it.
    fn nested(depth: usize) -> Vec<u8> {
        let mut b = vec![0x15, 0x02]; // field 1 (version): i32 1
        b.push(0x19); // field 2: list
        let n = depth + 2;
        if n < 15 {
            b.push(((n as u8) << 4) | 12);
        } else {
            b.push(0xfc);
            let mut v = n as u64;
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    b.push(byte);
                    break;
                }
                b.push(byte | 0x80);
            }
        }
        // root: name "s", num_children 1
        b.extend([0x48, 1, b's', 0x15, 2, 0]);
        for _ in 0..depth {
            // repetition 1, name "g", num_children 1
            b.extend([0x35, 2, 0x18, 1, b'g', 0x15, 2, 0]);
        }
        // leaf: type INT64, repetition, name "x"
        b.extend([0x15, 4, 0x25, 2, 0x18, 1, b'x', 0]);
        b.extend([0x16, 2]); // field 3 (num_rows): i64 1
        b.extend([0x19, 0x0c]); // field 4 (row groups): empty list
        b.push(0);
        b
    }

    #[test]
    fn depth_of_nested_and_flat_schemas() {
        assert_eq!(schema_depth(&nested(0), 8), Ok(2));
        assert_eq!(schema_depth(&nested(3), 8), Ok(5));
        assert_eq!(schema_depth(&nested(7), 8), Err(Walk::TooDeep));
        assert_eq!(schema_depth(&nested(100_000), 8), Err(Walk::TooDeep));
    }

    #[test]
    fn real_footers_from_arrow_rs_pass() {
        use arrow_array::{Int64Array, RecordBatch, StringArray};
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.parquet");
        let batch = RecordBatch::try_from_iter([
            ("Tenant_ID", Arc::new(StringArray::from(vec!["A", "B"])) as arrow_array::ArrayRef),
            ("Customer_ID", Arc::new(Int64Array::from(vec![1, 2]))),
        ])
        .unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&p).unwrap(), batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let len = f.metadata().unwrap().len();
        check_schema_depth(&f, len, 8).unwrap();
        assert!(check_schema_depth(&f, len, 1).unwrap_err().contains("more than 1 levels"));
    }

    #[test]
    fn truncated_or_hostile_footers_are_corrupt_never_a_panic() {
        let full = nested(2);
        // Every cut before the schema list's end (the last 5 bytes are fields 3, 4 and the end).
        for cut in 0..full.len() - 5 {
            assert!(matches!(schema_depth(&full[..cut], 8), Err(Walk::Corrupt(_))), "cut at {cut}");
        }
        // A list declaring 2^60 elements, structs nested past the limit.
        assert!(matches!(schema_depth(&[0x19, 0xfc, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10, 0], 8), Err(Walk::Corrupt(_))));
        // A child count typed i64, out of the i32 range, negative or given twice (the
        // decoder truncates such counts: a "leaf" to a lenient walk was a group to it).
        for root in [
            &[0x48, 1, b's', 0x16, 2, 0][..],                            // i64-typed
            &[0x48, 1, b's', 0x15, 0xfd, 0xff, 0xff, 0xff, 0x1f, 0][..], // 1 - 2^32, as a 64-bit varint
            &[0x48, 1, b's', 0x15, 3, 0][..],                            // -2
            &[0x48, 1, b's', 0x15, 2, 0x05, 10, 2, 0][..],               // twice (the second by its long form id 5)
        ] {
            let mut b = vec![0x15, 0x02, 0x19, 0x1c];
            b.extend(root);
            b.push(0);
            assert!(matches!(schema_depth(&b, 8), Err(Walk::Corrupt(_))), "{root:?}");
        }
        let mut deep = vec![0x1c; 40]; // field 1: struct, 40 times
        deep.extend([0; 41]);
        assert_eq!(schema_depth(&deep, 8), Err(Walk::Corrupt("Thrift structs nested too deep")));
    }
}
