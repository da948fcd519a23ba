//! Params in a stage: `${params.X}` and `${tenant}`.
//!
//! Rules:
//! - A string that is exactly one `${params.X}` keeps the param's type (a
//!   number stays a number); inside a longer string it is written as text.
//! - Every param a stage uses is recorded (`param_refs`), so `status` can
//!   say which param change made it stale.
//! - An undefined param is an error naming it and the params that exist.

use super::*;

pub(super) fn to_json(v: &yaml_serde::Value, what: &str) -> std::result::Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("{what}: unsupported value ({e})"))
}

/// Resolve `${params.X}` and `${tenant}` in a string. A string that is exactly
/// one `${params.X}` keeps the param's type.
pub(super) fn interpolate(
    s: &str,
    params: &IndexMap<String, Value>,
    tenant: Option<&str>,
    refs: &mut BTreeMap<String, Value>,
) -> std::result::Result<Value, String> {
    let trimmed = s.trim();
    if let Some(name) = trimmed.strip_prefix("${params.").and_then(|r| r.strip_suffix('}'))
        && !name.contains(['{', '}', '$'])
    {
        let v = params.get(name).ok_or_else(|| undefined_param(name, params))?;
        refs.insert(name.to_string(), v.clone());
        return Ok(v.clone());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let inner = &after[..end];
        if let Some(name) = inner.strip_prefix("params.") {
            let v = params.get(name).ok_or_else(|| undefined_param(name, params))?;
            refs.insert(name.to_string(), v.clone());
            match v {
                Value::String(s) => out.push_str(s),
                other => out.push_str(&other.to_string()),
            }
        } else if inner == "tenant" {
            let t = tenant.ok_or("uses ${tenant} but is not a `foreach: tenants` stage")?;
            out.push_str(t);
        } else {
            // Not ours (e.g. a shell ${VAR}): keep it as written.
            out.push_str(&rest[start..start + 2 + end + 1]);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

pub(super) fn undefined_param(name: &str, params: &IndexMap<String, Value>) -> String {
    let known: Vec<&str> = params.keys().map(String::as_str).collect();
    format!(
        "references ${{params.{name}}}, which is not defined; define it under `params:` (defined: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )
}

pub(super) fn interpolate_value(
    v: &Value,
    params: &IndexMap<String, Value>,
    tenant: Option<&str>,
    refs: &mut BTreeMap<String, Value>,
) -> std::result::Result<Value, String> {
    Ok(match v {
        Value::String(s) => interpolate(s, params, tenant, refs)?,
        Value::Array(a) => Value::Array(a.iter().map(|x| interpolate_value(x, params, tenant, refs)).collect::<std::result::Result<_, _>>()?),
        Value::Object(o) => {
            let mut m = Map::new();
            for (k, x) in o {
                m.insert(k.clone(), interpolate_value(x, params, tenant, refs)?);
            }
            Value::Object(m)
        }
        other => other.clone(),
    })
}

pub(super) fn interp_str(
    s: &str,
    params: &IndexMap<String, Value>,
    tenant: Option<&str>,
    refs: &mut BTreeMap<String, Value>,
) -> std::result::Result<String, String> {
    Ok(match interpolate(s, params, tenant, refs)? {
        Value::String(s) => s,
        other => other.to_string(),
    })
}
