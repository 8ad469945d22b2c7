//! The part of the exalsius OpenAPI spec the agent's contract tests check: the request and
//! response schemas of `PATCH /node/{node_id}` and `POST /node/self-register` and the error
//! body, with every relative `$ref` inlined. Used by `examples/extract-contract.rs` (which
//! writes `tests/contract/exalsius-api.json`) and by the test that checks that file against
//! `../shared/exalsius-api` when it is there.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

/// The component files the tests use, relative to the spec's `openapi/` directory.
pub const SCHEMAS: [&str; 5] = [
    "components/requests/node-patch-request.yaml",
    "components/schemas/node-patch-response.yaml",
    "components/requests/node-self-register-request.yaml",
    "components/schemas/node-self-register-response.yaml",
    "components/schemas/error.yaml",
];

/// Reads a YAML file as JSON.
pub fn load_yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the OpenAPI spec file {}: {e}", path.display()));
    let y: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    serde_json::to_value(y).unwrap()
}

/// Inlines every relative `$ref` and drops OpenAPI annotations that are not JSON Schema
/// keywords (`example`, `examples`).
pub fn inline(v: serde_json::Value, base: &Path) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let path = base.join(r);
                let loaded = load_yaml(&path);
                return inline(loaded, path.parent().unwrap());
            }
            Value::Object(
                map.into_iter()
                    .filter(|(k, _)| k != "example" && k != "examples")
                    .map(|(k, v)| (k, inline(v, base)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(|x| inline(x, base)).collect()),
        other => other,
    }
}

/// The extract: spec version, source and licence, and the inlined schemas by file.
pub fn extract(spec: &Path) -> serde_json::Value {
    let info = load_yaml(&spec.join("openapi.yaml"))["info"].clone();
    let schemas: serde_json::Map<String, serde_json::Value> = SCHEMAS
        .iter()
        .map(|rel| {
            let path = spec.join(rel);
            let schema = inline(load_yaml(&path), path.parent().unwrap());
            (rel.to_string(), schema)
        })
        .collect();
    serde_json::json!({
        "source": "exalsius OpenAPI spec (exalsius-api-spec), openapi/ — extracted by examples/extract-contract.rs",
        "spec_version": info["version"],
        "licence": info["license"]["name"],
        "schemas": schemas,
    })
}
