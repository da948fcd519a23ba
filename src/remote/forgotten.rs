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
//!   such an output with its hash. A listing that cannot be read here counts
//!   as holding it (withheld rather than leaked). A hash alone never counts:
//!   an empty marker file is not T's data.
//! - Derived records are followed to the end of each chain (a work list over
//!   an index of input paths: linear in records and inputs, not in the
//!   chain's depth), over this workspace's records and, for `pull`, the
//!   remote's records of the same pull.
//! - `gc` deletes a forgotten tenant's records; before it does, what they
//!   and the records derived from them output (path and hash, no data) is
//!   kept in `.dagrun/forgotten-outputs.json`, sealed ([`Forgotten::remember`]),
//!   and read back as if the records were still there: a record derived
//!   from T stays T's after the gc (it was pushed again once T's own
//!   records were gone). A file that does not verify is ignored, with a
//!   warning.
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
}

/// The file `gc` keeps forgotten tenants' outputs in (under `.dagrun/`).
pub const REMEMBERED: &str = "forgotten-outputs.json";
const REMEMBERED_FORMAT: &str = "dagrun-forgotten-outputs/1";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Remembered {
    format: String,
    /// Tenant → (output path, hash) of its records and those derived from them.
    outputs: BTreeMap<String, Vec<(String, String)>>,
    /// Checked by `record::open`, not used after.
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    mac: Option<String>,
}

/// What `gc` kept, verified (tenant → outputs); nothing when there is no
/// file, or one that does not verify (a warning).
fn remembered(states: &crate::workspace::state::StateStore) -> Vec<(String, Vec<(String, ContentHash)>)> {
    let path = states.workspace().dagrun_dir().join(REMEMBERED);
    let bytes = match crate::util::read_capped(&path, 64 << 20) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}; what gc kept of forgotten tenants' outputs is not used", path.display());
            return Vec::new();
        }
    };
    let shown = path.display().to_string();
    match crate::workspace::record::open::<Remembered>(states.integrity_key(), crate::workspace::record::FORGOTTEN_OUTPUTS, &bytes, &shown) {
        Ok(r) if r.format == REMEMBERED_FORMAT => {
            r.outputs.into_iter().map(|(t, outs)| (t, outs.into_iter().filter_map(|(p, h)| ContentHash::parse(&h).ok().map(|h| (p, h))).collect())).collect()
        }
        Ok(_) => {
            tracing::warn!("{shown} is not a file this dagrun reads; not used");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!("{e}; what gc kept of forgotten tenants' outputs is not used");
            Vec::new()
        }
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
        Forgotten { tenants: BTreeMap::new(), outputs: BTreeMap::new(), claimed: HashMap::new(), cas: None }
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
        let mut f = Self::new(tenants, cas);
        if !f.tenants.is_empty() {
            for (t, outs) in remembered(states) {
                if f.tenants.contains_key(&t) {
                    for (p, h) in outs {
                        let versions = f.outputs.entry(resolved(&p)).or_default();
                        if !versions.iter().any(|(vh, _)| *vh == h) {
                            versions.push((h, t.clone()));
                        }
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
        let mut outputs: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (p, versions) in &self.outputs {
            for (h, t) in versions {
                outputs.entry(t.clone()).or_default().push((p.clone(), h.to_string()));
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

    /// Whether the listing `h` gives `rel` the hash `want` (unreadable: yes).
    fn listed(&self, h: &ContentHash, rel: &str, want: &ContentHash) -> bool {
        match self.listing(h) {
            Some(entries) => entries.iter().any(|e| matches!(e, TreeEntry::File { path, hash, .. } if path == rel && hash == want)),
            None => true,
        }
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
            // A folder holding an output of T's.
            let below = format!("{p}/");
            for (o, versions) in self.outputs.range(below.clone()..).take_while(|(o, _)| o.starts_with(&below)) {
                if let Some((_, t)) = versions.iter().find(|(oh, _)| self.listed(&h, &o[below.len()..], oh)) {
                    return Some(t.clone());
                }
            }
        }
        None
    }

    fn claim(&mut self, st: &StageState, tenant: String) {
        for (p, o) in &st.outputs {
            let versions = self.outputs.entry(resolved(p)).or_default();
            if !versions.iter().any(|(h, _)| *h == o.hash) {
                versions.push((o.hash.clone(), tenant.clone()));
            }
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
