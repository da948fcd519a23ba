//! OpenLineage `RunEvent` (spec 2-0-2) and the facets dagrun emits.
//!
//! Field names follow `spec/OpenLineage.json` (`$id`
//! `https://openlineage.io/spec/2-0-2/OpenLineage.json`): a RunEvent has
//! `eventTime` (date-time), `producer` (uri) and `schemaURL` (uri) from
//! `BaseEvent`, and `eventType`, `run {runId (uuid), facets}`,
//! `job {namespace, name, facets}`, `inputs`, `outputs` (each
//! `{namespace, name, facets}`). Every facet carries `_producer` and
//! `_schemaURL`. Standard facets used, with the schema version they follow:
//!
//! | key | facet | schema |
//! | --- | --- | --- |
//! | run `parent` | ParentRunFacet: `run.runId`, `job.namespace`, `job.name`, `root` | facets/1-1-0 |
//! | run `errorMessage` | ErrorMessageRunFacet: `message`, `programmingLanguage` | facets/1-0-1 |
//! | run `processing_engine` | ProcessingEngineRunFacet: `version`, `name` | facets/1-1-1 |
//! | run `executionParameters` | ExecutionParametersRunFacet: `parameters [{key, value}]` | facets/1-0-0 |
//! | job `jobType` | JobTypeJobFacet: `processingType`, `integration`, `jobType` | facets/2-0-3 |
//! | job `documentation` | DocumentationJobFacet: `description` | facets/1-1-0 |
//! | dataset `version` | DatasetVersionDatasetFacet: `datasetVersion` | facets/1-0-1 |
//! | dataset `schema` | SchemaDatasetFacet: `fields [{name, type}]` | facets/1-1-1 |
//!
//! One custom run facet, `dagrun`, says what dagrun did with a stage
//! (`status` ran/cached/restored/failed, `workDone`, `cacheKey`, `reasons`,
//! `dagrunRunId`); its JSON Schema is `src/lineage/dagrun-facets.schema.json`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// `schemaURL` of every event dagrun emits.
pub const RUN_EVENT_SCHEMA: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";

/// `producer` of every event and facet: dagrun and its version (a URN:
/// dagrun has no canonical web address).
pub const PRODUCER: &str = concat!("urn:dagrun:", env!("CARGO_PKG_VERSION"));

/// `_schemaURL` base of dagrun's custom facets (the schema ships as
/// `src/lineage/dagrun-facets.schema.json`).
pub const DAGRUN_FACETS_SCHEMA: &str = "urn:dagrun:openlineage:facets:1-0-0";

/// Longest `errorMessage.message` sent (the full error is in the run record).
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// The run state transition an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Start,
    Complete,
    Fail,
    Abort,
}

impl EventType {
    pub fn is_terminal(self) -> bool {
        self != EventType::Start
    }
}

/// Facets by key.
pub type Facets = BTreeMap<String, Value>;

/// One OpenLineage run event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEvent {
    #[serde(rename = "eventType")]
    pub event_type: EventType,
    #[serde(rename = "eventTime")]
    pub event_time: String,
    pub run: Run,
    pub job: Job,
    pub inputs: Vec<Dataset>,
    pub outputs: Vec<Dataset>,
    pub producer: String,
    #[serde(rename = "schemaURL")]
    pub schema_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    #[serde(rename = "runId")]
    pub run_id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facets: Facets,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facets: Facets,
}

/// An input or output dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dataset {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facets: Facets,
}

impl RunEvent {
    /// A new event at `event_time` (RFC 3339) with no datasets.
    pub fn new(event_type: EventType, event_time: String, run: Run, job: Job) -> RunEvent {
        RunEvent { event_type, event_time, run, job, inputs: vec![], outputs: vec![], producer: PRODUCER.into(), schema_url: RUN_EVENT_SCHEMA.into() }
    }

    /// The event as one JSON line (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("an OpenLineage event always serializes")
    }
}

/// The current time as OpenLineage wants it (RFC 3339, UTC, milliseconds).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn facet(schema: &str, fields: Value) -> Value {
    let mut m = Map::new();
    m.insert("_producer".into(), PRODUCER.into());
    m.insert("_schemaURL".into(), schema.into());
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    Value::Object(m)
}

/// Run facet `parent`: the run (and job) that spawned this one; the pipeline
/// run is also the root.
pub fn parent_facet(run_id: &str, namespace: &str, name: &str) -> Value {
    facet(
        "https://openlineage.io/spec/facets/1-1-0/ParentRunFacet.json#/$defs/ParentRunFacet",
        json!({
            "run": {"runId": run_id},
            "job": {"namespace": namespace, "name": name},
            "root": {"run": {"runId": run_id}, "job": {"namespace": namespace, "name": name}},
        }),
    )
}

/// Run facet `errorMessage` (the message is cut to [`MAX_ERROR_MESSAGE`] bytes).
pub fn error_message_facet(message: &str) -> Value {
    let mut m = message.to_string();
    if m.len() > MAX_ERROR_MESSAGE {
        m.truncate(crate::util::floor_char_boundary(&m, MAX_ERROR_MESSAGE));
        m.push_str(" […]");
    }
    facet(
        "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet",
        json!({"message": m, "programmingLanguage": "Rust"}),
    )
}

/// Run facet `processing_engine`: dagrun and its version.
pub fn processing_engine_facet() -> Value {
    facet(
        "https://openlineage.io/spec/facets/1-1-1/ProcessingEngineRunFacet.json#/$defs/ProcessingEngineRunFacet",
        json!({"version": env!("CARGO_PKG_VERSION"), "name": "dagrun"}),
    )
}

/// Run facet `executionParameters`: `key` = param name, `value` = its value
/// (strings as they are, anything else as JSON).
pub fn parameters_facet<'a>(params: impl IntoIterator<Item = (&'a String, &'a Value)>) -> Value {
    let list: Vec<Value> = params
        .into_iter()
        .map(|(k, v)| {
            // A credential in a param is not exported (`util::redact::param_value`).
            let value = match crate::util::redact::param_value(v) {
                Value::String(s) => s,
                other => other.to_string(),
            };
            json!({"key": k, "value": value})
        })
        .collect();
    facet("https://openlineage.io/spec/facets/1-0-0/ExecutionParametersRunFacet.json#/$defs/ExecutionParametersRunFacet", json!({"parameters": list}))
}

/// Job facet `jobType`: a batch job of integration DAGRUN; `job_type` is
/// `DAG` (the pipeline) or `TASK` (a stage).
pub fn job_type_facet(job_type: &str) -> Value {
    facet(
        "https://openlineage.io/spec/facets/2-0-3/JobTypeJobFacet.json#/$defs/JobTypeJobFacet",
        json!({"processingType": "BATCH", "integration": "DAGRUN", "jobType": job_type}),
    )
}

/// Job facet `documentation`.
pub fn documentation_facet(description: &str) -> Value {
    facet("https://openlineage.io/spec/facets/1-1-0/DocumentationJobFacet.json#/$defs/DocumentationJobFacet", json!({"description": description}))
}

/// Dataset facet `version`: the dataset's blake3 content hash.
pub fn version_facet(blake3: &str) -> Value {
    facet(VERSION_FACET_SCHEMA, json!({"datasetVersion": blake3}))
}

/// `_schemaURL` of the dataset `version` facet.
pub const VERSION_FACET_SCHEMA: &str = "https://openlineage.io/spec/facets/1-0-1/DatasetVersionDatasetFacet.json#/$defs/DatasetVersionDatasetFacet";

/// [`version_facet`] as JSON, written straight into `buf` (the same bytes
/// as serializing the value: keys sorted, `_producer` and `_schemaURL` first).
pub fn push_version_facet(buf: &mut String, blake3: &str) {
    static HEAD: LazyLock<String> = LazyLock::new(|| {
        let mut b = String::from("{\"_producer\":");
        push_str_json(&mut b, PRODUCER);
        b.push_str(",\"_schemaURL\":");
        push_str_json(&mut b, VERSION_FACET_SCHEMA);
        b.push_str(",\"datasetVersion\":");
        b
    });
    buf.push_str(&HEAD);
    push_str_json(buf, blake3);
    buf.push('}');
}

/// `v` as compact JSON (a string quoted and escaped), appended to `buf`: the
/// bytes serializing it inside a [`RunEvent`] gives, for the writers that
/// build event lines by hand.
pub fn push_json<T: Serialize + ?Sized>(buf: &mut String, v: &T) {
    buf.push_str(&json_of(v));
}

/// `s` as a JSON string, appended to `buf`: quoted and escaped byte for byte
/// as serde_json escapes it (`"` and `\`, the short escapes `\b \f \n \r
/// \t`, other control characters as `\u00xx`; nothing else), without the
/// allocation [`push_json`] makes. Event lines are built from hundreds of
/// these per stage.
pub fn push_str_json(buf: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.push('"');
    let mut start = 0;
    for (i, &c) in s.as_bytes().iter().enumerate() {
        let short = match c {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        // `c` is ASCII, so `i` and `i + 1` are char boundaries.
        buf.push_str(&s[start..i]);
        if short.is_empty() {
            buf.push_str("\\u00");
            buf.push(HEX[(c >> 4) as usize] as char);
            buf.push(HEX[(c & 0xf) as usize] as char);
        } else {
            buf.push_str(short);
        }
        start = i + 1;
    }
    buf.push_str(&s[start..]);
    buf.push('"');
}

/// `v` as compact JSON (see [`push_json`]).
pub fn json_of<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("event parts (strings, facets) always serialize")
}

/// One column of a dataset schema: its name and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub r#type: String,
}

/// Dataset facet `schema`: column names and types (never values).
pub fn schema_facet(fields: &[Field]) -> Value {
    let list: Vec<Value> = fields.iter().map(|f| json!({"name": f.name, "type": f.r#type})).collect();
    facet("https://openlineage.io/spec/facets/1-1-1/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet", json!({"fields": list}))
}

/// Run facet `dagrun`: what dagrun did (see the module doc).
pub fn dagrun_facet(fields: Value) -> Value {
    facet(&dagrun_facet_schema(), fields)
}

/// `_schemaURL` of the `dagrun` run facet.
pub fn dagrun_facet_schema() -> String {
    format!("{DAGRUN_FACETS_SCHEMA}#/$defs/DagrunRunFacet")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_serializes_with_the_spec_field_names() {
        let mut run = Run { run_id: crate::lineage::ids::uuid_v7(1, b"r"), facets: Facets::new() };
        run.facets.insert("errorMessage".into(), error_message_facet("boom"));
        let job = Job { namespace: "dagrun://h/w".into(), name: "p".into(), facets: Facets::new() };
        let e = RunEvent::new(EventType::Fail, now(), run, job);
        let v: Value = serde_json::from_str(&e.to_line()).unwrap();
        assert_eq!(v["eventType"], "FAIL");
        assert_eq!(v["schemaURL"], RUN_EVENT_SCHEMA);
        assert_eq!(v["producer"], PRODUCER);
        assert!(v["eventTime"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["run"]["facets"]["errorMessage"]["message"], "boom");
        assert_eq!(v["run"]["facets"]["errorMessage"]["programmingLanguage"], "Rust");
        assert!(v["run"]["facets"]["errorMessage"]["_schemaURL"].as_str().unwrap().contains("ErrorMessageRunFacet"));
        assert!(v["job"].get("facets").is_none());
        let back: RunEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back.event_type, EventType::Fail);
    }

    #[test]
    fn the_version_facet_written_directly_is_the_serialized_value() {
        for h in ["", "ab12", "a\"b\\c\u{1}é"] {
            let mut b = String::new();
            push_version_facet(&mut b, h);
            assert_eq!(b, serde_json::to_string(&version_facet(h)).unwrap());
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é€😀\u{2028}\u{7f}/");
        for s in [all.as_str(), "", "plain", "\"", "\\", "a\u{0}b\u{1f}c\u{1b}[0m", "x\ny\rz\tw\u{8}\u{c}"] {
            let mut b = String::from("pre");
            push_str_json(&mut b, s);
            assert_eq!(b, format!("pre{}", serde_json::to_string(s).unwrap()), "{s:?}");
        }
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let f = error_message_facet(&long);
        let m = f["message"].as_str().unwrap();
        assert!(m.len() <= MAX_ERROR_MESSAGE + 8 && m.ends_with("[…]"));
    }

    #[test]
    fn parameters_keep_strings_and_render_other_values_as_json() {
        let p: BTreeMap<String, Value> = [("C".to_string(), json!(1.0)), ("output".to_string(), json!("models/x.json"))].into();
        let f = parameters_facet(&p);
        assert_eq!(f["parameters"][0], json!({"key": "C", "value": "1.0"}));
        assert_eq!(f["parameters"][1], json!({"key": "output", "value": "models/x.json"}));
    }
}
