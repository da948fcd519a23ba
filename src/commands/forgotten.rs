//! What of a forgotten tenant (`dagrun keys forget`) `push` and `pull` must
//! not move: after the erasure, nothing of it goes to the shared remote or
//! comes back from it. Shredding leaves the tenant's readable derived data
//! (features, statistics, models) in this workspace by design; copying it
//! elsewhere afterwards would undo the point of the erasure.
//!
//! Rules:
//! - A record of a tenant's stage (`NAME[T]`) belongs to T.
//! - A record of any other stage belongs to T when one of its inputs is
//!   something a record of T (or of such a derived stage) produced: by path
//!   (the same path, a file inside such an output folder, or a folder that
//!   holds such an output) or by content (the same hash). The derived
//!   records are found to the end of a chain (a fixed point over this
//!   workspace's records).
//! - Known from this workspace's records only: where the records of T's
//!   stages are gone here (deleted with their folders), a record derived from
//!   them cannot be traced.

use crate::crypto::Keyring;
use crate::workspace::state::{Loaded, StageState, StateStore};
use std::collections::{BTreeMap, HashMap};

/// The forgotten tenants and what their data is known as here.
#[derive(Default)]
pub struct Forgotten {
    /// Tenant → when it was forgotten.
    tenants: BTreeMap<String, String>,
    /// Output paths and hashes of records that belong to a forgotten tenant,
    /// with the tenant.
    paths: BTreeMap<String, String>,
    hashes: HashMap<String, String>,
    /// Keys of those records (tenant's own and derived), with the tenant.
    records: BTreeMap<String, String>,
}

impl Forgotten {
    /// The forgotten tenants of `ring`, and every local record (state and
    /// action entries that verify) that belongs to one of them.
    pub fn of(ring: &Keyring, states: &StateStore) -> Self {
        let mut f = Forgotten::default();
        let all: Vec<StageState> = states
            .scan_states()
            .into_iter()
            .chain(states.scan_actions())
            .filter_map(|(_, l)| match l {
                Loaded::Valid(st) => Some(st),
                _ => None,
            })
            .collect();
        for st in &all {
            if let Ok(Some(t)) = super::pull::tenant_of(&st.stage)
                && let Some(at) = ring.is_forgotten(&t)
            {
                f.tenants.insert(t.clone(), at);
                f.add(st, &t);
            }
        }
        if f.tenants.is_empty() {
            return f;
        }
        // Untenanted records derived from them, to the end of each chain.
        loop {
            let mut grew = false;
            for st in &all {
                if !f.records.contains_key(st.key.as_str())
                    && matches!(super::pull::tenant_of(&st.stage), Ok(None))
                    && let Some(t) = f.source_of(st)
                {
                    f.add(st, &t);
                    grew = true;
                }
            }
            if !grew {
                return f;
            }
        }
    }

    fn add(&mut self, st: &StageState, tenant: &str) {
        self.records.insert(st.key.to_string(), tenant.to_string());
        for (p, o) in &st.outputs {
            self.paths.insert(p.clone(), tenant.to_string());
            self.hashes.insert(o.hash.to_string(), tenant.to_string());
        }
    }

    /// The forgotten tenant one of `st`'s inputs comes from, if any.
    fn source_of(&self, st: &StageState) -> Option<String> {
        st.ingredients
            .inputs
            .iter()
            .find_map(|(path, hash)| {
                self.hashes.get(hash).or_else(|| {
                    self.paths.iter().find(|(o, _)| *o == path || crate::util::path_within(path, o) || crate::util::path_within(o, path)).map(|(_, t)| t)
                })
            })
            .cloned()
    }

    /// The forgotten tenant record `st` (of tenant `tenant`) belongs to, if
    /// any (see the module's rules).
    pub fn claims(&self, ring: &Keyring, st: &StageState, tenant: Option<&str>) -> Option<String> {
        if let Some(t) = tenant {
            return ring.is_forgotten(t).map(|_| t.to_string());
        }
        if let Some(t) = self.records.get(st.key.as_str()) {
            return Some(t.clone());
        }
        self.source_of(st)
    }
}
