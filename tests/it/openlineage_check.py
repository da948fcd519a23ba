"""Outside parser for dagrun's OpenLineage events (called by tests/it/openlineage.rs).

Rebuilds every event of a JSONL file with the official `openlineage-python`
client classes (whose attrs validators check the event time, the run id
UUID, the producer and schema URLs, and the facets' required fields), then
serializes it back with the client's own serializer and compares it with
dagrun's JSON: they must agree on every field the client models. A facet's
`_schemaURL` is set by the client to its own (newest) facet version, so that
one field is compared separately: ours must be an openlineage.io facet URL of
the same facet. Prints "checked N events" and exits 0, or exits 1 naming the
event line and the difference.
"""

import json
import sys

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated import (
    dataset_version_dataset,
    documentation_job,
    error_message_run,
    execution_parameters_run,
    job_type_job,
    parent_run,
    processing_engine_run,
    schema_dataset,
)
from openlineage.client.serde import Serde

STANDARD = {
    "parent": "ParentRunFacet",
    "errorMessage": "ErrorMessageRunFacet",
    "processing_engine": "ProcessingEngineRunFacet",
    "executionParameters": "ExecutionParametersRunFacet",
    "jobType": "JobTypeJobFacet",
    "documentation": "DocumentationJobFacet",
    "version": "DatasetVersionDatasetFacet",
    "schema": "SchemaDatasetFacet",
}


def fail(line, msg):
    print(f"event on line {line}: {msg}")
    sys.exit(1)


def run_facet(k, v):
    p = v["_producer"]
    if k == "parent":
        root = v.get("root")
        return parent_run.ParentRunFacet(
            run=parent_run.Run(runId=v["run"]["runId"]),
            job=parent_run.Job(namespace=v["job"]["namespace"], name=v["job"]["name"]),
            root=None
            if root is None
            else parent_run.Root(
                run=parent_run.RootRun(runId=root["run"]["runId"]),
                job=parent_run.RootJob(namespace=root["job"]["namespace"], name=root["job"]["name"]),
            ),
            producer=p,
        )
    if k == "errorMessage":
        return error_message_run.ErrorMessageRunFacet(message=v["message"], programmingLanguage=v["programmingLanguage"], producer=p)
    if k == "processing_engine":
        return processing_engine_run.ProcessingEngineRunFacet(version=v["version"], name=v.get("name"), producer=p)
    if k == "executionParameters":
        return execution_parameters_run.ExecutionParametersRunFacet(
            parameters=[execution_parameters_run.ExecutionParameter(key=x["key"], value=x.get("value")) for x in v["parameters"]],
            producer=p,
        )
    return None


def job_facet(k, v):
    p = v["_producer"]
    if k == "jobType":
        return job_type_job.JobTypeJobFacet(processingType=v["processingType"], integration=v["integration"], jobType=v.get("jobType"), producer=p)
    if k == "documentation":
        return documentation_job.DocumentationJobFacet(description=v["description"], producer=p)
    return None


def dataset_facet(k, v):
    p = v["_producer"]
    if k == "version":
        return dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=v["datasetVersion"], producer=p)
    if k == "schema":
        return schema_dataset.SchemaDatasetFacet(
            fields=[schema_dataset.SchemaDatasetFacetFields(name=f["name"], type=f.get("type")) for f in v["fields"]],
            producer=p,
        )
    return None


def build(facets, make, line, where):
    out = {}
    for k, v in (facets or {}).items():
        if not isinstance(v, dict) or not isinstance(v.get("_producer"), str) or not isinstance(v.get("_schemaURL"), str):
            fail(line, f"{where} facet {k} lacks _producer/_schemaURL")
        if k in STANDARD:
            url = v["_schemaURL"]
            if not (url.startswith("https://openlineage.io/spec/facets/") and f"/{STANDARD[k]}.json#/$defs/{STANDARD[k]}" in url):
                fail(line, f"{where} facet {k}: _schemaURL {url} is not the {STANDARD[k]} schema")
            f = make(k, v)
            if f is None:
                fail(line, f"{where} facet {k} is not modelled here")
            out[k] = f
    return out


def strip(d):
    """Drop what the client fills in itself (schema URLs) and empty values."""
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if k != "_schemaURL" and v not in (None, [], {})}
    if isinstance(d, list):
        return [strip(x) for x in d]
    return d


def main(path):
    n = 0
    with open(path, encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, 1):
            ev = json.loads(text)
            rf = build(ev["run"].get("facets"), run_facet, line_no, "run")
            jf = build(ev["job"].get("facets"), job_facet, line_no, "job")

            def datasets(items, cls, where):
                return [cls(namespace=d["namespace"], name=d["name"], facets=build(d.get("facets"), dataset_facet, line_no, where)) for d in items]

            e = RunEvent(
                eventType=RunState(ev["eventType"]),
                eventTime=ev["eventTime"],
                run=Run(runId=ev["run"]["runId"], facets=rf),
                job=Job(namespace=ev["job"]["namespace"], name=ev["job"]["name"], facets=jf),
                producer=ev["producer"],
                inputs=datasets(ev["inputs"], InputDataset, "input"),
                outputs=datasets(ev["outputs"], OutputDataset, "output"),
            )
            back = Serde.to_dict(e)
            if back.get("schemaURL") != ev["schemaURL"]:
                fail(line_no, f"schemaURL {ev['schemaURL']} != the client's {back.get('schemaURL')}")
            # Compare with dagrun's event, custom (non-standard) facets left out.
            mine = json.loads(text)
            for holder in [mine["run"], mine["job"]] + mine["inputs"] + mine["outputs"]:
                holder["facets"] = {k: v for k, v in holder.get("facets", {}).items() if k in STANDARD}
            a, b = strip(mine), strip(back)
            if a != b:
                fail(line_no, f"the client reads it differently:\n dagrun: {json.dumps(a, sort_keys=True)}\n client: {json.dumps(b, sort_keys=True)}")
            n += 1
    print(f"checked {n} events")


if __name__ == "__main__":
    main(sys.argv[1])
