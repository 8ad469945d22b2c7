//! The API contract kept in the repository (`tests/contract/exalsius-api.json`, extracted from
//! the exalsius OpenAPI spec by `examples/extract-contract.rs`) is the one the spec beside the
//! repository defines, when it is there; and the agent reads the fields the spec promises.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use support::*;

#[test]
fn the_extract_matches_the_spec_beside_the_repository() {
    let Some(spec) = spec_dir() else {
        eprintln!(
            "skipped: ../shared/exalsius-api is not beside this clone; the tests use the extract in tests/contract/"
        );
        return;
    };
    let fresh = contract::extract(&spec);
    let kept = contract_extract();
    assert_eq!(
        fresh["spec_version"],
        kept["spec_version"],
        "a new spec version: regenerate with `cargo run --example extract-contract -- {} > tests/contract/exalsius-api.json` and review the diff",
        spec.display()
    );
    assert!(
        fresh == kept,
        "tests/contract/exalsius-api.json differs from {}: regenerate it (cargo run --example extract-contract) and review the diff",
        spec.display()
    );
}

#[test]
fn the_extract_holds_what_the_tests_need() {
    let kept = contract_extract();
    assert_eq!(kept["licence"], "Apache-2.0");
    assert!(kept["spec_version"].is_string());
    for rel in contract::SCHEMAS {
        let s = schema(rel);
        assert_eq!(s["type"], "object", "{rel}");
        assert!(
            !s.to_string().contains("$ref"),
            "{rel} still has a $ref: {s}"
        );
    }
}

/// The agent reads `next_access_token`, `next_access_token_expires_in` and
/// `next_access_token_type` and requires `node_id`: the same names the spec gives both answers.
#[test]
fn the_agent_reads_the_answer_fields_the_spec_defines() {
    for rel in [
        "components/schemas/node-patch-response.yaml",
        "components/schemas/node-self-register-response.yaml",
    ] {
        let s = schema(rel);
        let mut props: Vec<&str> = s["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        props.sort_unstable();
        assert_eq!(
            props,
            [
                "next_access_token",
                "next_access_token_expires_in",
                "next_access_token_type",
                "node_id"
            ],
            "{rel}"
        );
        assert_eq!(s["required"], serde_json::json!(["node_id"]), "{rel}");
        // A full answer, as the spec describes it, is read with its token.
        let body = serde_json::json!({
            "node_id": NODE_ID, "next_access_token": "t",
            "next_access_token_expires_in": 3600, "next_access_token_type": "Bearer"
        });
        assert_valid(rel, &body);
        let answer = serde_json::from_value::<exalsius_node_agent::api::TokenResponse>(body)
            .unwrap()
            .interpret()
            .unwrap();
        assert_eq!(answer.issued.unwrap().token.expose(), "t");
    }
}
