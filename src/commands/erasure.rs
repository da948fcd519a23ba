//! What `dagrun push` does on the remote for a tenant forgotten here: what
//! earlier pushes put there of it, or derived from it, is deleted, and a
//! tombstone (`remote::erasure`) makes every workspace sharing the remote
//! leave the tenant alone from then on.
//!
//! Rules:
//! - Only a proven erasure (`Keyring::erasures`: `keys forget` sealed it
//!   here and no key of the tenant is left) deletes. An unproven tombstone
//!   (added by hand, copied from another workspace) only withholds, as
//!   before.
//! - Once per tenant: a push finds the tenant's tombstone on the remote and
//!   does nothing more. A push that did not finish (killed, a failed
//!   deletion) wrote no tombstone, and the next push erases again.
//! - The tenant's prefix goes whole, the tombstone excepted
//!   (`remote::erasure::erase_prefix`). Outside it, the records that derive
//!   from the tenant (`remote::forgotten`'s rules, traced over this
//!   workspace's records and every record on the remote that verifies under
//!   its integrity key) are deleted, then the objects they name that no
//!   remaining verified record of the same prefix names. A record that does
//!   not verify is nobody's: it is neither traced nor kept alive.
//! - A push limited by `--tenant` erases the prefix only (a credential
//!   scoped to it cannot look elsewhere), and its tombstone says so
//!   (`elsewhere: false`): the next push without `--tenant` does the rest.
//! - Records first, then objects: a reader never finds a record whose
//!   objects are gone.

use super::pull::{open_pulled, validate_tree};
use crate::remote::Remote;
use crate::remote::erasure::{self, Erased, Found};
use crate::remote::forgotten::Forgotten;
use crate::workspace::cas::Cas;
use crate::workspace::hashing::{MAX_LISTING_BYTES, TreeEntry};
use crate::workspace::state::{StageState, StateStore};
use crate::workspace::{ContentHash, Workspace};
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One tenant's erasure, as `push --json` reports it.
#[derive(Debug, Default, serde::Serialize)]
pub struct TenantErasure {
    pub tenant: String,
    /// What went from `PREFIX/tenants/T/`.
    pub prefix: Erased,
    /// Records outside the prefix derived from the tenant, deleted.
    pub derived_records: usize,
    /// Objects only those records named, deleted.
    pub derived_objects: usize,
    pub derived_bytes: u64,
    /// Whether the records outside the prefix were looked at (not with `--tenant`).
    pub elsewhere: bool,
    /// The tombstone is written: the erasure is complete.
    pub done: bool,
}

/// Tenant `t`'s tombstones on the remote, for each of `tenants`.
pub fn tombstones<'a>(remote: &Remote, key: &crate::crypto::IntegrityKey, tenants: impl IntoIterator<Item = &'a str>) -> Result<BTreeMap<String, Found>> {
    let mut out = BTreeMap::new();
    for t in tenants {
        if !out.contains_key(t) {
            out.insert(t.to_string(), erasure::read(remote, key, t)?);
        }
    }
    Ok(out)
}

/// The records under a prefix that verify under `key` and belong there, and
/// the reads that failed (whether those records derive from a forgotten
/// tenant is unknown). A record that does not verify is nobody's (rules).
fn verified_records(remote: &Remote, key: &crate::crypto::IntegrityKey, scope: Option<&str>) -> Result<(Vec<StageState>, Vec<String>)> {
    let (mut found, mut unread) = (Vec::new(), Vec::new());
    for k in remote.list_actions(scope)? {
        let bytes = match remote.get_action(scope, &k) {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) if crate::remote::is_untrusted(&e) => continue,
            Err(e) => {
                unread.push(format!("{e:#}"));
                continue;
            }
        };
        if let Ok((st, t)) = open_pulled(&bytes, key, &k)
            && t.as_deref() == scope
        {
            found.push(st);
        }
    }
    Ok((found, unread))
}

/// A verified record on the remote outside the erased prefixes.
struct Held {
    scope: Option<String>,
    st: StageState,
}

/// The objects a record names in its prefix: its cached outputs and the
/// files of its folder outputs. None when a folder's listing cannot be read
/// (from the local cache, else the remote) and verified.
fn objects_of(remote: &Remote, cas: &Cas, scope: Option<&str>, st: &StageState) -> Option<BTreeSet<ContentHash>> {
    let mut out = BTreeSet::new();
    for o in st.outputs.values().filter(|o| o.cached && !o.sensitive) {
        out.insert(o.hash.clone());
        if o.dir {
            let local = crate::util::read_capped(&cas.object_path(&o.hash), MAX_LISTING_BYTES).ok();
            let bytes = local.filter(|b| ContentHash::of_bytes(b) == o.hash).or_else(|| {
                let loc = remote.object_location(scope, o.hash.as_str());
                remote.get_small(&loc, MAX_LISTING_BYTES, "a directory listing").ok().flatten().filter(|b| ContentHash::of_bytes(b) == o.hash)
            })?;
            for e in validate_tree(&bytes).ok()? {
                if let TreeEntry::File { hash, .. } = e {
                    out.insert(hash);
                }
            }
        }
    }
    Some(out)
}

/// Erase `todo` (tenant → when it was forgotten here; each a proven
/// erasure) from the remote. `limited`: the push is limited by `--tenant`
/// (the prefixes only). Failed deletions are appended to `failed`; a
/// tenant with any is not `done`.
pub fn erase(
    remote: &Remote,
    states: &StateStore,
    ws: &Workspace,
    key: &crate::crypto::IntegrityKey,
    todo: &BTreeMap<String, String>,
    limited: bool,
    failed: &mut Vec<String>,
) -> Result<Vec<TenantErasure>> {
    let mut out: BTreeMap<String, TenantErasure> = BTreeMap::new();
    let mut clean: BTreeMap<String, bool> = BTreeMap::new();
    // The tenant's records on the remote, read before they go: what they
    // output is how records elsewhere are known to derive from it (this
    // workspace's own may be gone: `gc`).
    let mut seeds: Vec<StageState> = Vec::new();
    if !limited {
        for t in todo.keys() {
            let (found, unread) = verified_records(remote, key, Some(t))?;
            seeds.extend(found);
            if !unread.is_empty() {
                clean.insert(t.clone(), false);
                failed.extend(unread);
            }
        }
    }
    for t in todo.keys() {
        let (prefix, f) = erasure::erase_prefix(remote, t)?;
        *clean.entry(t.clone()).or_insert(true) &= f.is_empty();
        failed.extend(f);
        out.insert(t.clone(), TenantErasure { tenant: t.clone(), prefix, elsewhere: !limited, ..Default::default() });
    }
    if !limited {
        let (derived, f) = erase_derived(remote, states, ws, key, todo, seeds)?;
        if !f.is_empty() {
            clean.values_mut().for_each(|c| *c = false);
        }
        failed.extend(f);
        for (t, (r, o, b)) in derived {
            if let Some(e) = out.get_mut(&t) {
                (e.derived_records, e.derived_objects, e.derived_bytes) = (r, o, b);
            }
        }
    }
    for (t, e) in out.iter_mut() {
        if clean[t] {
            match erasure::write(remote, key, t, &todo[t], !limited) {
                Ok(_) => e.done = true,
                Err(err) => failed.push(format!("{err:#}")),
            }
        }
    }
    Ok(out.into_values().collect())
}

/// Delete, outside the erased prefixes, the records derived from `todo`'s
/// tenants and the objects only they name. Returns per tenant (records,
/// objects, bytes) and the failed deletions.
#[allow(clippy::type_complexity)]
fn erase_derived(
    remote: &Remote,
    states: &StateStore,
    ws: &Workspace,
    key: &crate::crypto::IntegrityKey,
    todo: &BTreeMap<String, String>,
    seeds: Vec<StageState>,
) -> Result<(BTreeMap<String, (usize, usize, u64)>, Vec<String>)> {
    let cas = &Cas::read_only(ws);
    let mut scopes: Vec<Option<String>> = vec![None];
    scopes.extend(remote.list_tenants()?.into_iter().filter(|t| !todo.contains_key(t)).map(Some));
    let mut held: Vec<Held> = Vec::new();
    let mut unread = Vec::new();
    for scope in &scopes {
        let (found, u) = verified_records(remote, key, scope.as_deref())?;
        held.extend(found.into_iter().map(|st| Held { scope: scope.clone(), st }));
        unread.extend(u);
    }
    let mut gone = Forgotten::of_workspace(todo.clone(), states, Cas::read_only(ws));
    gone.trace(seeds.iter().chain(held.iter().map(|h| &h.st)));
    let (claimed, kept): (Vec<(String, Held)>, Vec<Held>) = {
        let mut c = Vec::new();
        let mut k = Vec::new();
        for h in held {
            match gone.claims(&h.st) {
                Some(t) => c.push((t, h)),
                None => k.push(h),
            }
        }
        (c, k)
    };
    let mut counts: BTreeMap<String, (usize, usize, u64)> = BTreeMap::new();
    let mut failed = unread;
    if claimed.is_empty() {
        return Ok((counts, failed));
    }
    let locs: Vec<_> = claimed.iter().map(|(_, h)| remote.action_location(h.scope.as_deref(), h.st.key.as_str())).collect();
    for ((t, _), r) in claimed.iter().zip(remote.delete(&locs)) {
        match r {
            Ok(()) => counts.entry(t.clone()).or_default().0 += 1,
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        // No object goes while a record naming it may still be there.
        return Ok((counts, failed));
    }
    // Objects the deleted records named, per prefix, less those a remaining one names.
    let mut candidates: BTreeMap<(Option<String>, ContentHash), String> = BTreeMap::new();
    for (t, h) in &claimed {
        match objects_of(remote, cas, h.scope.as_deref(), &h.st) {
            Some(objs) => {
                for o in objs {
                    candidates.entry((h.scope.clone(), o)).or_insert_with(|| t.clone());
                }
            }
            None => failed.push(format!(
                "record {} ({}) derived from tenant {t} is deleted, but its folder listing could not be read: the objects it names are not (push again to retry)",
                h.st.key.short(),
                crate::crypto::escape_for_message(&h.st.stage)
            )),
        }
    }
    let scopes_hit: BTreeSet<Option<String>> = candidates.keys().map(|(s, _)| s.clone()).collect();
    let mut live: HashMap<Option<String>, BTreeSet<ContentHash>> = HashMap::new();
    for h in kept.iter().filter(|h| scopes_hit.contains(&h.scope)) {
        match objects_of(remote, cas, h.scope.as_deref(), &h.st) {
            Some(objs) => live.entry(h.scope.clone()).or_default().extend(objs),
            None => {
                // Which files it names is unknown: nothing of that prefix goes.
                failed.push(format!(
                    "the folder listing of record {} ({}) could not be read, so which objects it still needs is unknown: no object derived from a forgotten tenant was deleted under its prefix (push again to retry)",
                    h.st.key.short(),
                    crate::crypto::escape_for_message(&h.st.stage)
                ));
                live.entry(h.scope.clone()).or_default().extend(candidates.keys().filter(|(s, _)| *s == h.scope).map(|(_, o)| o.clone()));
            }
        }
    }
    let doomed: Vec<(&(Option<String>, ContentHash), &String)> = candidates.iter().filter(|((s, o), _)| !live.get(s).is_some_and(|l| l.contains(o))).collect();
    let sizes: HashMap<Option<String>, BTreeMap<String, u64>> = {
        let mut m = HashMap::new();
        for s in &scopes_hit {
            m.insert(s.clone(), remote.list_objects(s.as_deref())?);
        }
        m
    };
    let locs: Vec<_> = doomed.iter().map(|((s, o), _)| remote.object_location(s.as_deref(), o.as_str())).collect();
    for (((s, o), t), r) in doomed.iter().zip(remote.delete(&locs)) {
        match r {
            Ok(()) => {
                if let Some(size) = sizes.get(s).and_then(|m| m.get(o.as_str())) {
                    let c = counts.entry((*t).clone()).or_default();
                    c.1 += 1;
                    c.2 += size;
                }
            }
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    Ok((counts, failed))
}
