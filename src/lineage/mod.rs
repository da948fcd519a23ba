//! OpenLineage export: the event types of the OpenLineage spec 2-0-2 and the
//! writers that deliver them to a catalog (Marquez, DataHub, OpenMetadata…).
//!
//! Not to be confused with `engine::lineage`, which is dagrun's *own* trace of
//! how an artifact was made (read back from the state files for `dagrun
//! lineage PATH`). This module knows nothing about the engine: the engine
//! builds events from its records (`engine::openlineage`) and hands them here.
//!
//! Rules:
//! - Every event is a `RunEvent` whose `schemaURL` is [`event::RUN_EVENT_SCHEMA`];
//!   facets carry `_producer` and the `_schemaURL` of the facet's published
//!   schema (custom dagrun facets point at [`event::DAGRUN_FACETS_SCHEMA`]).
//! - Events describe the pipeline and its datasets by name, hash and schema:
//!   never a data value, a key, or the bearer token.
//! - Run ids are UUIDv7 derived from the dagrun run id ([`ids`]), so a stage's
//!   OpenLineage run can always be traced back to `runs/RUN_ID.json`.
//! - Transports ([`transport`]): always a JSONL file (one event per line,
//!   appended as each event happens, never a torn line); optionally an HTTP endpoint, sent from a
//!   background thread with bounded timeouts. An endpoint that is down or slow
//!   never fails or slows the run: what is not delivered when the run ends is
//!   spooled for that endpoint (`.dagrun/openlineage/pending-ID.jsonl`) and
//!   sent first at the next run with the same endpoint, never to another
//!   (at-least-once: a consumer may see an event twice, never zero times
//!   unless the spool cap drops the oldest or the endpoint refuses the event
//!   for good, which is counted and kept in `dropped.jsonl`: see [`transport`]).
//! - A run killed before its end (SIGKILL…) leaves its runs open; the next
//!   run closes each with one `ABORT` ([`recover`]), in the killed run's file
//!   and to the endpoint, exactly once.

pub mod event;
pub mod ids;
pub mod recover;
pub mod transport;

/// Environment variable holding the OpenLineage endpoint's base URL.
pub const URL_ENV: &str = "DAGRUN_OPENLINEAGE_URL";

/// Environment variable holding the optional bearer token. It is read once,
/// sent only in the `Authorization` header, never logged or recorded, and
/// removed from the environment of every command dagrun starts.
pub const TOKEN_ENV: &str = "DAGRUN_OPENLINEAGE_TOKEN";
