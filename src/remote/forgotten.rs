//! What of a forgotten tenant (`dagrun keys forget`) must not cross to or
//! from the shared remote (`push`, `pull`, `run --pull`). Shredding leaves
//! the tenant's readable derived data (features, statistics, models) in the
//! workspace by design; copying it elsewhere after the erasure, or fetching
//! it back, would undo the point of it.
//!
//! Rules:
//! - A record of a forgotten tenant's stage (`NAME[T]`) belongs to T.
//! - Any other record — untenanted, or another tenant's (a shared model
//!   scored per tenant) — belongs to T when one of its inputs is data of T:
//!   the same path (compared after `.`/`..` are resolved) with the same hash
//!   as an output of a record of T; a file inside such an output folder with
//!   the hash that folder's listing gives it; or a folder whose listing holds
//!   such an output with its hash. A folder input's listing is not kept: it
//!   is rebuilt from the file outputs recorded below it (the combination of
//!   their versions that hashes to the input's hash, as the engine hashes a
//!   folder). A listing that can be neither read nor rebuilt counts as
//!   holding it (withheld rather than leaked), except for an erasure, which
//!   deletes only what is proven ([`Forgotten::strict`]). A hash alone never
//!   counts: an empty marker file is not T's data.
//! - Derived records are followed to the end of each chain (a work list over
//!   an index of input paths: linear in records and inputs, not in the
//!   chain's depth), over this workspace's records and, for `pull`, the
//!   remote's records of the same pull.
//! - `gc` deletes a forgotten tenant's records; before it does, what they
//!   and the records derived from them output (path and hash, no data) is
//!   kept in `.dagrun/forgotten-outputs.json`, sealed ([`Forgotten::remember`]),
//!   and read back as if the records were still there: a record derived
//!   from T stays T's after the gc (it was pushed again once T's own
//!   records were gone). A file that cannot be read or does not verify
//!   stops push, pull and gc (exit 4): what derives from the tenant is then
//!   unknown ([`Forgotten::damaged`]); `run --pull` fetches nothing.
//! - Known from records only: a stage that reads T's data without declaring
//!   it, or through a symlink that renames the folder, is not traced; nor is a
//!   remote record derived from records this workspace no longer has.

use crate::workspace::ContentHash;
use crate::workspace::cas::Cas;
use crate::workspace::hashing::{MAX_LISTING_BYTES, TreeEntry, decode_tree};
use crate::workspace::state::StageState;
use std::collections::{BTreeMap, HashMap};

/// The forgotten tenants and what their data is known as.
pub struct Forgotten {
    /// Tenant → when it was forgotten.
    tenants: BTreeMap<String, String>,
    /// Outputs that hold forgotten data: resolved path → every (hash,
    /// tenant) recorded there (a path's older versions stay in the cache).
    outputs: BTreeMap<String, Vec<(ContentHash, String)>>,
    /// Keys of the records that belong to a forgotten tenant.
    claimed: HashMap<ContentHash, String>,
    cas: Option<Cas>,
    /// A folder listing that cannot be read counts as not holding T's data
    /// (for deleting: only what is proven derived; [`Forgotten::strict`]).
    strict: bool,
    /// Why what `gc` kept cannot be used (see [`Forgotten::damaged`]).
    damaged: Option<String>,
    /// Every file output of every record traced: resolved path → (hash,
    /// size, exec) versions, to rebuild a folder input's listing.
    files: BTreeMap<String, Vec<(ContentHash, u64, bool)>>,
}

/// Most combinations of recorded versions tried to rebuild one folder's listing.
const MAX_REBUILDS: usize = 4096;

/// The file `gc` keeps forgotten tenants' outputs in (under `.dagrun/`).
pub const REMEMBERED: &str = "forgotten-outputs.json";
const REMEMBERED_FORMAT: &str = "dagrun-forgotten-outputs/1";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Remembered {
    format: String,
    /// Tenant → (output path, hash) of its records and those derived from them.
    outputs: BTreeMap<String, Vec<Kept>>,
    /// Checked by `record::open`, not used after.
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    mac: Option<String>,
}

/// One output kept: its path and hash; a file's size and execute bit when known.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Kept {
    path: String,
    hash: ContentHash,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exec: Option<bool>,
}

/// What `gc` kept, verified (tenant → outputs); nothing when there is no
/// file; why, when there is one that cannot be read or does not verify.
#[allow(clippy::type_complexity)]
fn remembered(states: &crate::workspace::state::StateStore) -> Result<Vec<(String, Vec<Kept>)>, String> {
    let path = states.workspace().dagrun_dir().join(REMEMBERED);
    let bytes = match crate::util::read_capped(&path, 64 << 20) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let shown = path.display().to_string();
    match crate::workspace::record::open::<Remembered>(states.integrity_key(), crate::workspace::record::FORGOTTEN_OUTPUTS, &bytes, &shown) {
        Ok(r) if r.format == REMEMBERED_FORMAT => Ok(r.outputs.into_iter().collect()),
        Ok(_) => Err(format!("{shown} is not a file this dagrun reads")),
        Err(e) => Err(e.to_string()),
    }
}

/// `p` with `.` and empty components dropped and `..` applied.
fn resolved(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// The folders above `p` (`a/b/c` → `a/b`, `a`).
fn ancestors(p: &str) -> impl Iterator<Item = &str> {
    p.match_indices('/').map(move |(i, _)| &p[..i])
}

impl Forgotten {
    /// Nothing forgotten (and nothing claimed).
    pub fn none() -> Self {
        Forgotten {
            tenants: BTreeMap::new(),
            outputs: BTreeMap::new(),
            claimed: HashMap::new(),
            cas: None,
            strict: false,
            damaged: None,
            files: BTreeMap::new(),
        }
    }

    /// The tenants `tenants` (tenant → when) forgotten; folder listings are
    /// read from `cas`.
    pub fn new(tenants: BTreeMap<String, String>, cas: Cas) -> Self {
        Forgotten { tenants, cas: Some(cas), ..Self::none() }
    }

    /// The tenants `tenants` forgotten, with every record of `states` (state
    /// records and action-cache entries that verify) traced, and what `gc`
    /// kept of the records it deleted.
    pub fn of_workspace(tenants: BTreeMap<String, String>, states: &crate::workspace::state::StateStore, cas: Cas) -> Self {
        Self::new(tenants, cas).traced_in(states)
    }

    /// Trace every record of `states` and what `gc` kept (see [`Forgotten::of_workspace`]).
    pub fn traced_in(self, states: &crate::workspace::state::StateStore) -> Self {
        let mut f = self;
        if !f.tenants.is_empty() {
            let kept = remembered(states).unwrap_or_else(|why| {
                f.damaged = Some(why);
                Vec::new()
            });
            for (t, outs) in kept {
                if f.tenants.contains_key(&t) {
                    for k in outs {
                        if let Some(size) = k.size {
                            f.note_file(&k.path, &k.hash, size, k.exec);
                        }
                        f.note_output(&k.path, &k.hash, &t);
                    }
                }
            }
            let all: Vec<StageState> = states
                .scan_states()
                .into_iter()
                .chain(states.scan_actions())
                .filter_map(|(_, l)| match l {
                    crate::workspace::state::Loaded::Valid(st) => Some(st),
                    _ => None,
                })
                .collect();
            f.trace(&all);
        }
        f
    }

    /// Keep what the forgotten tenants' records and those derived from them
    /// output (`.dagrun/forgotten-outputs.json`, sealed), before `gc`
    /// deletes the records: see the module's rules.
    pub fn remember(&self, states: &crate::workspace::state::StateStore) -> anyhow::Result<()> {
        let Some(key) = states.integrity_key() else { anyhow::bail!("no integrity key to seal {REMEMBERED} with") };
        // Never written over a file that cannot be used: what it held would be lost.
        let before = match (self.damaged(), remembered(states)) {
            (Some(why), _) => return Err(crate::error::Failure::Integrity(why).into()),
            (None, Err(why)) => return Err(crate::error::Failure::Integrity(why).into()),
            (None, Ok(before)) => before,
        };
        // What it holds of tenants this tracing does not cover stays.
        let mut outputs: BTreeMap<String, Vec<Kept>> = before.into_iter().filter(|(t, _)| !self.tenants.contains_key(t)).collect();
        for (p, versions) in &self.outputs {
            for (h, t) in versions {
                // A file's size and execute bit, if a traced record gave them
                // (to rebuild a folder's listing): the same bytes have one
                // size; an execute bit noted both ways is not known.
                let same: Vec<&(ContentHash, u64, bool)> = self.files.get(p).into_iter().flatten().filter(|(fh, _, _)| fh == h).collect();
                let (size, exec) = (same.first().map(|(_, s, _)| *s), (same.len() == 1).then(|| same[0].2));
                outputs.entry(t.clone()).or_default().push(Kept { path: p.clone(), hash: h.clone(), size, exec });
            }
        }
        let rec = Remembered { format: REMEMBERED_FORMAT.to_string(), outputs, mac: None };
        let bytes = crate::workspace::record::seal(key, crate::workspace::record::FORGOTTEN_OUTPUTS, &rec)?;
        crate::util::atomic::write_atomic(&states.workspace().dagrun_dir().join(REMEMBERED), &bytes)
    }

    /// When tenant `t` was forgotten, if it was.
    pub fn when(&self, t: &str) -> Option<&str> {
        self.tenants.get(t).map(String::as_str)
    }

    /// The listing of folder object `h`, if this workspace's cache has it intact.
    fn listing(&self, h: &ContentHash) -> Option<Vec<TreeEntry>> {
        let b = crate::util::read_capped(&self.cas.as_ref()?.object_path(h), MAX_LISTING_BYTES).ok()?;
        (ContentHash::of_bytes(&b) == *h).then(|| decode_tree(&b).ok()).flatten()
    }

    /// Whether the listing `h` gives `rel` the hash `want` (unreadable: yes,
    /// unless strict).
    fn listed(&self, h: &ContentHash, rel: &str, want: &ContentHash) -> bool {
        match self.listing(h) {
            Some(entries) => Self::lists(&entries, rel, want),
            None => !self.strict,
        }
    }

    fn lists(entries: &[TreeEntry], rel: &str, want: &ContentHash) -> bool {
        entries.iter().any(|e| matches!(e, TreeEntry::File { path, hash, .. } if path == rel && hash == want))
    }

    /// The listing of folder `dir` whose hash is `h`, rebuilt from the file
    /// outputs recorded below it: each combination of their versions (or
    /// their absence) is encoded as the engine hashes a folder input, and
    /// the one that hashes to `h` is its listing, proven. None when none
    /// does (the folder held a file no record made, or a link) or there are
    /// too many to try.
    fn rebuild(&self, dir: &str, h: &ContentHash) -> Option<Vec<TreeEntry>> {
        let below = format!("{dir}/");
        let paths: Vec<(&str, &Vec<(ContentHash, u64, bool)>)> =
            self.files.range(below.clone()..).take_while(|(p, _)| p.starts_with(&below)).map(|(p, v)| (&p[below.len()..], v)).collect();
        let mut total: usize = 1;
        for (_, v) in &paths {
            total = total.checked_mul(v.len() + 1).filter(|n| *n <= MAX_REBUILDS)?;
        }
        for mut n in 0..total {
            let mut entries = Vec::new();
            for (rel, versions) in &paths {
                let pick = n % (versions.len() + 1);
                n /= versions.len() + 1;
                if let Some((hash, size, exec)) = versions.get(pick) {
                    entries.push(TreeEntry::File { path: rel.to_string(), hash: hash.clone(), size: Some(*size), exec: *exec });
                }
            }
            entries.sort_by(|a, b| a.path().cmp(b.path()));
            if ContentHash::of_bytes(&crate::workspace::hashing::encode_tree(&entries)) == *h {
                return Some(entries);
            }
        }
        None
    }

    /// Why what `gc` kept of forgotten tenants' outputs cannot be used (the
    /// file cannot be read or does not verify), if so: then what derives
    /// from them is not known, and nothing may cross to or from the remote
    /// on this tracing's word.
    pub fn damaged(&self) -> Option<String> {
        self.damaged.as_ref().map(|why| {
            format!(
                "{why}: without it, what derives from the forgotten tenant(s) ({}) is unknown, so nothing crosses to or from the remote; restore it from a backup (deleting it lets push send records derived from them again)",
                self.tenants.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// This tracing, made strict before any record is traced: a folder
    /// listing that cannot be read no longer counts as holding T's data, so
    /// what is claimed is proven derived (what an erasure may delete).
    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    /// Every hash known as data of a forgotten tenant (outputs of its
    /// records, of records derived from them, and what `gc` kept), with
    /// that tenant.
    pub fn hashes(&self) -> HashMap<ContentHash, String> {
        self.outputs.values().flatten().map(|(h, t)| (h.clone(), t.clone())).collect()
    }

    /// The forgotten tenant one of `st`'s inputs is data of, if any.
    fn source_of(&self, st: &StageState) -> Option<String> {
        if self.outputs.is_empty() {
            return None;
        }
        for (p, h) in &st.ingredients.inputs {
            let Ok(h) = ContentHash::parse(h) else { continue };
            let p = resolved(p);
            if let Some((_, t)) = self.outputs.get(&p).into_iter().flatten().find(|(oh, _)| *oh == h) {
                return Some(t.clone());
            }
            // Inside an output folder of T's.
            for a in ancestors(&p) {
                if let Some((_, t)) = self.outputs.get(a).into_iter().flatten().find(|(oh, _)| self.listed(oh, &p[a.len() + 1..], &h)) {
                    return Some(t.clone());
                }
            }
            // A folder holding an output of T's (its listing from the cache,
            // else rebuilt from the outputs recorded in it).
            let below = format!("{p}/");
            let mut inside = self.outputs.range(below.clone()..).take_while(|(o, _)| o.starts_with(&below)).peekable();
            if inside.peek().is_some() {
                let entries = self.listing(&h).or_else(|| self.rebuild(&p, &h));
                for (o, versions) in inside {
                    let rel = &o[below.len()..];
                    let holds = |oh: &ContentHash| entries.as_ref().map_or(!self.strict, |e| Self::lists(e, rel, oh));
                    if let Some((_, t)) = versions.iter().find(|(oh, _)| holds(oh)) {
                        return Some(t.clone());
                    }
                }
            }
        }
        None
    }

    /// `hash` at `path` is data of `tenant`.
    fn note_output(&mut self, path: &str, hash: &ContentHash, tenant: &str) {
        let versions = self.outputs.entry(resolved(path)).or_default();
        if !versions.iter().any(|(h, _)| h == hash) {
            versions.push((hash.clone(), tenant.to_string()));
        }
    }

    /// A file version recorded at `path` (to rebuild a folder's listing); a
    /// record older than the execute bit (`exec` None) gives either.
    fn note_file(&mut self, path: &str, hash: &ContentHash, size: u64, exec: Option<bool>) {
        let versions = self.files.entry(resolved(path)).or_default();
        for exec in exec.map_or(vec![false, true], |e| vec![e]) {
            if !versions.contains(&(hash.clone(), size, exec)) {
                versions.push((hash.clone(), size, exec));
            }
        }
    }

    fn claim(&mut self, st: &StageState, tenant: String) {
        for (p, o) in &st.outputs {
            self.note_output(p, &o.hash, &tenant);
        }
        self.claimed.insert(st.key.clone(), tenant);
    }

    /// Claim, among `records`, every one that belongs to a forgotten tenant,
    /// to the end of each chain (see the module's rules).
    pub fn trace<'a>(&mut self, records: impl IntoIterator<Item = &'a StageState>) {
        if self.tenants.is_empty() {
            return;
        }
        let records: Vec<&StageState> = records.into_iter().collect();
        for st in &records {
            for (p, o) in st.outputs.iter().filter(|(_, o)| !o.dir) {
                self.note_file(p, &o.hash, o.size, o.exec);
            }
        }
        // Input path → the records reading it.
        let mut readers: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, st) in records.iter().enumerate() {
            for p in st.ingredients.inputs.keys() {
                readers.entry(resolved(p)).or_default().push(i);
            }
        }
        let mut queue: Vec<usize> = Vec::new();
        for (i, st) in records.iter().enumerate() {
            if self.claimed.contains_key(&st.key) {
                continue;
            }
            let own = crate::pipeline::tenants::tenant_of_stage(&st.stage).ok().flatten().filter(|t| self.tenants.contains_key(t));
            if let Some(t) = own.or_else(|| self.source_of(st)) {
                self.claim(st, t);
                queue.push(i);
            }
        }
        while let Some(i) = queue.pop() {
            // Who reads one of its outputs: the same path, below it, or above it.
            let mut next: Vec<usize> = Vec::new();
            for p in records[i].outputs.keys() {
                let p = resolved(p);
                next.extend(readers.get(&p).into_iter().flatten());
                let below = format!("{p}/");
                for (_, r) in readers.range(below.clone()..).take_while(|(k, _)| k.starts_with(&below)) {
                    next.extend(r);
                }
                for a in ancestors(&p) {
                    next.extend(readers.get(a).into_iter().flatten());
                }
            }
            for j in next {
                let st = records[j];
                if !self.claimed.contains_key(&st.key)
                    && let Some(t) = self.source_of(st)
                {
                    self.claim(st, t);
                    queue.push(j);
                }
            }
        }
    }

    /// [`Forgotten::claims`], and a record claimed joins the traced ones (a
    /// record fetched later that reads its outputs is claimed too).
    pub fn note(&mut self, st: &StageState) -> Option<String> {
        let t = self.claims(st)?;
        self.claim(st, t.clone());
        Some(t)
    }

    /// The forgotten tenant record `st` belongs to, if any: its own stage's
    /// tenant, a record [`Forgotten::trace`] claimed, or one whose inputs
    /// are data of one.
    pub fn claims(&self, st: &StageState) -> Option<String> {
        if let Ok(Some(t)) = crate::pipeline::tenants::tenant_of_stage(&st.stage)
            && self.tenants.contains_key(&t)
        {
            return Some(t);
        }
        self.claimed.get(&st.key).cloned().or_else(|| self.source_of(st))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_resolved_and_folders_above_listed() {
        assert_eq!(resolved("tools/../out/./A/"), "out/A");
        assert_eq!(resolved("./a"), "a");
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), vec!["a", "a/b"]);
        assert_eq!(ancestors("a").count(), 0);
    }
}
