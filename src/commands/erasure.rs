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
//! - First the tenant's records on the remote are read (a credential scoped
//!   to its prefix may), and what they, this workspace's records and the
//!   records elsewhere on the remote derived from them output is kept in
//!   `.dagrun/forgotten-outputs.json` (`Forgotten::remember`) before
//!   anything is deleted: a push that stops half-way, or a `--tenant` push
//!   that deletes the prefix, loses nothing the next push needs.
//! - The tenant's prefix goes whole, the tombstone excepted
//!   (`remote::erasure::erase_prefix`). Outside it, a record is deleted when
//!   it is proven to derive from the tenant (`remote::forgotten`'s rules,
//!   strict: through a folder listing that can be read or rebuilt from the
//!   outputs recorded in it), or may (a folder input whose listing can be
//!   neither) and this workspace holds the same
//!   record (it made or fetched it, so its own tracing withholds it). A
//!   record that only may is left and counted (`uncertain_records`). A
//!   record that does not verify is nobody's: neither traced nor kept alive.
//! - Then, in every prefix outside the tenant's, each object whose hash is
//!   known as the tenant's data (or that a deleted record named) and that no
//!   remaining verified record names is deleted: found by its hash, so an
//!   object whose record went in an earlier, interrupted push goes too.
//! - A push limited by `--tenant` erases the prefix only (a credential
//!   scoped to it cannot look elsewhere), and its tombstone says so
//!   (`elsewhere: false`): the next push without `--tenant` does the rest.
//! - Records first, then objects: a reader never finds a record whose
//!   objects are gone. The tombstone is written only when nothing failed.

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
    /// Objects outside the prefix holding its data that no remaining record names, deleted.
    pub derived_objects: usize,
    /// Their bytes (objects only).
    pub derived_bytes: u64,
    /// Records that may derive from it (a folder input whose listing is
    /// unknown here) and that this workspace does not hold: left.
    pub uncertain_records: usize,
    /// Whether the records outside the prefix were looked at (not with `--tenant`).
    pub elsewhere: bool,
    /// The tombstone is written: the erasure is complete.
    pub done: bool,
}

/// Tenant `t`'s tombstones on the remote, for each of `tenants`. After a
/// read from object storage that failed for another reason than access to
/// that prefix (no answer: the remote is down), the rest are not asked: one
/// wait, not one per tenant.
pub fn tombstones<'a>(remote: &Remote, key: &crate::crypto::IntegrityKey, tenants: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, Found> {
    let mut out = BTreeMap::new();
    let mut down: Option<String> = None;
    for t in tenants {
        if out.contains_key(t) {
            continue;
        }
        let f = match &down {
            Some(why) => Found::Unreadable(why.clone()),
            None => erasure::read(remote, key, t),
        };
        // (A folder remote's errors are the file's own: a link loop planted there.)
        if let Found::Unreadable(why) = &f
            && down.is_none()
            && remote.local_dir().is_none()
            && !why.contains("access denied")
        {
            down = Some(why.clone());
        }
        out.insert(t.to_string(), f);
    }
    out
}

/// What push and pull withhold: the tenants forgotten here, those the
/// remote's tombstones say were erased, and those whose tombstone cannot be
/// read (whether they were erased is unknown).
pub struct Withheld {
    /// Tenant → when it was forgotten or erased (empty: unknown).
    pub tenants: BTreeMap<String, String>,
    /// The tenants withheld because their tombstone cannot be read, with why.
    pub unreadable: BTreeMap<String, String>,
    /// Tombstones that do not verify (tenant, why): they withhold nothing.
    pub untrusted: Vec<(String, String)>,
}

/// [`Withheld`] from the tenants forgotten here and the tombstones
/// [`tombstones`] found; a tenant forgotten here is withheld as such,
/// whatever the remote holds for it.
pub fn withheld(forgotten_here: &BTreeMap<String, String>, found: BTreeMap<String, Found>) -> Withheld {
    let mut w = Withheld { tenants: forgotten_here.clone(), unreadable: BTreeMap::new(), untrusted: Vec::new() };
    for (t, f) in found.into_iter().filter(|(t, _)| !forgotten_here.contains_key(t)) {
        match f {
            Found::Valid(ts) => {
                w.tenants.insert(t, ts.erased_at);
            }
            Found::Unreadable(why) => {
                w.tenants.insert(t.clone(), String::new());
                w.unreadable.insert(t, why);
            }
            Found::Untrusted(why) => w.untrusted.push((t, why)),
            Found::None => {}
        }
    }
    w
}

/// The end of a line about tenant `t`, erased from the remote by another
/// workspace: what is left to do here, if this keyring still holds its keys.
pub fn forget_here_too(ring: &crate::crypto::Keyring, t: &str) -> String {
    if super::keys::holds_keys(ring, t) { format!("; this workspace still holds its keys: run `dagrun keys forget {t} --yes` here too") } else { String::new() }
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
/// tenant with any is not `done`. Exit 4 when what `gc` kept of forgotten
/// tenants cannot be used (nothing deleted).
pub fn erase(
    remote: &Remote,
    states: &StateStore,
    ws: &Workspace,
    key: &crate::crypto::IntegrityKey,
    todo: &BTreeMap<String, String>,
    limited: bool,
    failed: &mut Vec<String>,
) -> Result<Vec<TenantErasure>> {
    let cas = &Cas::read_only(ws);
    let mut out: BTreeMap<String, TenantErasure> =
        todo.keys().map(|t| (t.clone(), TenantErasure { tenant: t.clone(), elsewhere: !limited, ..Default::default() })).collect();
    let mut clean = true;
    // 1. What is there: the tenants' own records (read before they go), and
    //    every verified record elsewhere.
    let mut seeds: Vec<StageState> = Vec::new();
    for t in todo.keys() {
        let (found, unread) = verified_records(remote, key, Some(t))?;
        seeds.extend(found);
        clean &= unread.is_empty();
        failed.extend(unread);
    }
    let mut held: Vec<Held> = Vec::new();
    if !limited {
        let mut scopes: Vec<Option<String>> = vec![None];
        scopes.extend(remote.list_tenants()?.into_iter().filter(|t| !todo.contains_key(t)).map(Some));
        for scope in &scopes {
            let (found, unread) = verified_records(remote, key, scope.as_deref())?;
            held.extend(found.into_iter().map(|st| Held { scope: scope.clone(), st }));
            clean &= unread.is_empty();
            failed.extend(unread);
        }
    }
    // 2. Traced: what may be the tenants' data (kept, withheld) and what is
    //    proven (deleted), then kept before anything goes.
    let mut may = Forgotten::new(todo.clone(), Cas::read_only(ws)).traced_in(states);
    if let Some(why) = may.damaged() {
        return Err(crate::error::Failure::Integrity(format!("{why}; nothing was erased from the remote")).into());
    }
    may.trace(seeds.iter().chain(held.iter().map(|h| &h.st)));
    let mut proven = Forgotten::new(todo.clone(), Cas::read_only(ws)).strict().traced_in(states);
    proven.trace(seeds.iter().chain(held.iter().map(|h| &h.st)));
    may.remember(states).map_err(|e| e.context("cannot keep what the forgotten tenants' records output; nothing was erased from the remote"))?;
    // 3. The prefixes.
    for t in todo.keys() {
        let (prefix, f) = erasure::erase_prefix(remote, t)?;
        clean &= f.is_empty();
        failed.extend(f);
        if let Some(e) = out.get_mut(t) {
            e.prefix = prefix;
        }
    }
    // 4. Elsewhere: the records derived from them, then the objects.
    if !limited && clean {
        let local = |k: &ContentHash| matches!(states.load_action(k), crate::workspace::state::Loaded::Valid(_));
        let mut doomed: Vec<(String, Held)> = Vec::new();
        let mut kept: Vec<Held> = Vec::new();
        for h in held {
            match (proven.claims(&h.st), may.claims(&h.st)) {
                (Some(t), _) => doomed.push((t, h)),
                (None, Some(t)) if local(&h.st.key) => doomed.push((t, h)),
                (None, Some(t)) => {
                    if let Some(e) = out.get_mut(&t) {
                        e.uncertain_records += 1;
                    }
                    kept.push(h);
                }
                (None, None) => kept.push(h),
            }
        }
        let locs: Vec<_> = doomed.iter().map(|(_, h)| remote.action_location(h.scope.as_deref(), h.st.key.as_str())).collect();
        for ((t, _), r) in doomed.iter().zip(remote.delete(&locs)) {
            match r {
                Ok(()) => out.entry(t.clone()).or_default().derived_records += 1,
                Err(e) => {
                    clean = false;
                    failed.push(format!("{e:#}"));
                }
            }
        }
        if clean {
            clean &= erase_objects(remote, cas, &may, &doomed, &kept, &mut out, failed)?;
        }
    }
    for (t, e) in out.iter_mut() {
        if clean {
            match erasure::write(remote, key, t, &todo[t], !limited) {
                Ok(_) => e.done = true,
                Err(err) => failed.push(format!("{err:#}")),
            }
        }
    }
    Ok(out.into_values().collect())
}

/// In every prefix outside the erased ones, delete each object whose hash is
/// known as the tenants' data or that a deleted record named, and that no
/// remaining record names. Returns whether nothing failed.
fn erase_objects(
    remote: &Remote,
    cas: &Cas,
    may: &Forgotten,
    doomed: &[(String, Held)],
    kept: &[Held],
    out: &mut BTreeMap<String, TenantErasure>,
    failed: &mut Vec<String>,
) -> Result<bool> {
    let mut clean = true;
    // Hash → the tenant it is data of (for the counts).
    let mut known: HashMap<ContentHash, String> = HashMap::new();
    for (t, h) in doomed {
        match objects_of(remote, cas, h.scope.as_deref(), &h.st) {
            Some(objs) => objs.into_iter().for_each(|o| {
                known.entry(o).or_insert_with(|| t.clone());
            }),
            None => {
                clean = false;
                failed.push(format!(
                    "record {} ({}) derived from tenant {t} is deleted, but its folder listing could not be read: the files in it are deleted by the next push, which finds them by their hashes",
                    h.st.key.short(),
                    crate::crypto::escape_for_message(&h.st.stage)
                ));
            }
        }
    }
    for (h, t) in may.hashes() {
        known.entry(h).or_insert(t);
    }
    let mut scopes: BTreeSet<Option<String>> = kept.iter().map(|h| h.scope.clone()).collect();
    scopes.extend(doomed.iter().map(|(_, h)| h.scope.clone()));
    scopes.insert(None);
    scopes.extend(remote.list_tenants()?.into_iter().filter(|t| !out.contains_key(t)).map(Some));
    for scope in scopes {
        let there = remote.list_objects(scope.as_deref())?;
        let mut candidates: Vec<(String, u64)> = there.into_iter().filter(|(h, _)| ContentHash::parse(h).is_ok_and(|h| known.contains_key(&h))).collect();
        if candidates.is_empty() {
            continue;
        }
        let mut live: BTreeSet<ContentHash> = BTreeSet::new();
        for h in kept.iter().filter(|h| h.scope == scope) {
            match objects_of(remote, cas, scope.as_deref(), &h.st) {
                Some(objs) => live.extend(objs),
                None => {
                    // Which files it names is unknown: nothing of that prefix goes.
                    clean = false;
                    failed.push(format!(
                        "the folder listing of record {} ({}) could not be read, so which objects it still needs is unknown: no object holding a forgotten tenant's data was deleted under its prefix (push again to retry)",
                        h.st.key.short(),
                        crate::crypto::escape_for_message(&h.st.stage)
                    ));
                    candidates.clear();
                }
            }
        }
        candidates.retain(|(h, _)| ContentHash::parse(h).is_ok_and(|h| !live.contains(&h)));
        let locs: Vec<_> = candidates.iter().map(|(h, _)| remote.object_location(scope.as_deref(), h)).collect();
        for ((h, size), r) in candidates.iter().zip(remote.delete(&locs)) {
            match r {
                Ok(()) => {
                    // (Every candidate's hash is in `known`.)
                    let e = out.entry(ContentHash::parse(h).ok().and_then(|h| known.get(&h).cloned()).unwrap_or_default()).or_default();
                    e.derived_objects += 1;
                    e.derived_bytes += size;
                }
                Err(e) => {
                    clean = false;
                    failed.push(format!("{e:#}"));
                }
            }
        }
    }
    Ok(clean)
}
