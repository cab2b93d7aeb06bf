//! The OpenAPI document served at `/openapi.json` describes what the code does: every route the
//! router and each room register, with the same methods; every error code `error.rs` and each
//! room's refusals can produce; and no reference that leads nowhere.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// The router's source: the routes it registers are read from here.
const ROUTER_SOURCE: &str = include_str!("../src/lib.rs");
/// Where every error code is made.
const ERRORS_SOURCE: &str = include_str!("../src/error.rs");

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(farthing_server::openapi_json()).expect("the document is valid JSON")
}

/// The end (exclusive) of the parenthesised call whose `(` is at `open`, skipping string
/// literals.
fn call_end(source: &str, open: usize) -> usize {
    let bytes = source.as_bytes();
    assert_eq!(bytes[open], b'(');
    let mut depth = 0usize;
    let mut index = open;
    let mut in_string = false;
    while index < bytes.len() {
        let byte = bytes[index];
        if in_string {
            match byte {
                b'\\' => index += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        return index + 1;
                    }
                }
                _ => {}
            }
        }
        index += 1;
    }
    panic!("unbalanced parentheses after byte {open}");
}

/// The first string literal in `text`, and the rest after it.
fn first_string_literal(text: &str) -> Option<(&str, &str)> {
    let start = text.find('"')? + 1;
    let length = text[start..].find('"')?;
    Some((&text[start..start + length], &text[start + length + 1..]))
}

/// The sources that register routes: the router's, then each room's (`src/rooms/*.rs`).
fn router_sources() -> Vec<String> {
    let rooms = concat!(env!("CARGO_MANIFEST_DIR"), "/src/rooms");
    let mut sources = vec![ROUTER_SOURCE.to_string()];
    let mut files: Vec<_> = std::fs::read_dir(rooms)
        .expect("the rooms' routes read")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no room registers routes");
    for file in files {
        sources.push(std::fs::read_to_string(file).expect("a room's routes read"));
    }
    sources
}

/// Every `.route("path", method(...)...)` call of the router and the rooms, as path →
/// methods. Calls may span several lines; the methods are the `get(`/`post(`/… method-router
/// calls inside them.
fn router_routes() -> BTreeMap<String, BTreeSet<String>> {
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let sources = router_sources();
    for (source, at) in sources.iter().flat_map(|source| {
        source
            .match_indices(".route(")
            .map(move |(at, _)| (source, at))
    }) {
        let open = at + ".route".len();
        let call = &source[open..call_end(source, open)];
        let (path, handlers) = first_string_literal(call).expect("a route names its path");
        let mut methods = BTreeSet::new();
        for method in HTTP_METHODS {
            let needle = format!("{method}(");
            for (index, _) in handlers.match_indices(&needle) {
                let before = handlers[..index].chars().next_back();
                if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    methods.insert(method.to_string());
                }
            }
        }
        assert!(!methods.is_empty(), "route {path} has no method in {call}");
        let previous = routes.insert(path.to_string(), methods);
        assert!(previous.is_none(), "route {path} is registered twice");
    }
    routes
}

/// Every code given to `ApiError::new` in `error.rs` (its second argument), and every code
/// of a room's refusals, which `error.rs` answers through `explained.code`.
fn error_codes() -> BTreeSet<String> {
    let mut codes = BTreeSet::new();
    let mut rooms_answered = false;
    for (at, _) in ERRORS_SOURCE.match_indices("ApiError::new(") {
        let open = at + "ApiError::new".len();
        let call = &ERRORS_SOURCE[open + 1..call_end(ERRORS_SOURCE, open) - 1];
        let (_, rest) = call
            .split_once(',')
            .expect("ApiError::new takes a status first");
        let rest = rest.trim_start();
        if rest.starts_with("explained.code") {
            rooms_answered = true;
            continue;
        }
        assert!(
            rest.starts_with('"'),
            "the code of ApiError::new({call}) is not a string literal"
        );
        let (code, _) = first_string_literal(rest).expect("a code literal");
        codes.insert(code.to_string());
    }
    assert!(rooms_answered, "error.rs answers rooms' refusals");
    let every = farthing_payments::RoomRejection::every();
    assert!(!every.is_empty(), "rooms refuse something");
    codes.extend(
        every
            .iter()
            .map(|rejection| rejection.explain().code.to_string()),
    );
    codes
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for (method, operation) in item.as_object().expect("a path item is an object") {
            if HTTP_METHODS.contains(&method.as_str()) {
                out.push((path.clone(), method.clone(), operation));
            }
        }
    }
    out
}

/// Follows `$ref`s (local ones only) until a value that is not a reference.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    let mut value = value;
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{reference} is not a local reference"));
        value = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{reference} does not resolve"));
    }
    value
}

fn collect_refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if key == "$ref" {
                    out.push(child.as_str().expect("a $ref is a string"));
                } else {
                    collect_refs(child, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_refs(item, out)),
        _ => {}
    }
}

/// Every string a `code` property is constrained to (`const` or `enum`) or shown as.
fn documented_codes(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(code) = map.get("code").filter(|c| c.is_object()) {
                for key in ["const", "enum", "examples"] {
                    match code.get(key) {
                        Some(Value::String(text)) => {
                            out.insert(text.clone());
                        }
                        Some(Value::Array(items)) => {
                            out.extend(items.iter().filter_map(Value::as_str).map(String::from));
                        }
                        _ => {}
                    }
                }
            }
            map.values().for_each(|child| documented_codes(child, out));
        }
        Value::Array(items) => items.iter().for_each(|item| documented_codes(item, out)),
        _ => {}
    }
}

#[test]
fn the_document_parses_as_json_and_declares_openapi_3_1() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(version.starts_with("3.1."), "openapi is {version}");
    assert!(doc["info"]["title"].is_string());
    assert!(doc["info"]["version"].is_string());
}

#[test]
fn the_router_source_yields_every_route_with_its_methods() {
    let routes = router_routes();
    // Guards the parser itself: a multi-line `.route(` with two methods is read whole.
    assert_eq!(
        routes.get("/v1/payments"),
        Some(&BTreeSet::from(["get".to_string(), "post".to_string()]))
    );
    assert_eq!(
        routes.get("/v1/payers/{id}/transactions"),
        Some(&BTreeSet::from(["get".to_string()]))
    );
    assert!(routes.contains_key("/healthz"));
    assert!(routes.len() >= 13, "only {} routes found", routes.len());
}

#[test]
fn every_route_in_the_router_is_documented_with_the_same_methods() {
    let doc = document();
    let routes = router_routes();
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, method, _) in operations(&doc) {
        documented.entry(path).or_default().insert(method);
    }
    assert_eq!(
        documented, routes,
        "documented paths and methods (left) differ from the router's (right)"
    );
}

#[test]
fn every_ref_in_the_document_resolves() {
    let doc = document();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{reference} is not a local reference"));
        assert!(
            doc.pointer(pointer).is_some(),
            "{reference} does not resolve"
        );
    }
}

#[test]
fn every_error_code_that_error_rs_can_produce_is_documented() {
    let doc = document();
    let codes = error_codes();
    // Guards the parser: the codes the HTTP contract names are all found.
    for code in [
        "unauthorized",
        "not_found",
        "validation_failed",
        "insufficient_funds",
        "funding_declined",
        "idempotency_key_reused",
        "refund_exceeds_payment",
        "payload_too_large",
        "rate_limited",
        "shutting_down",
        "storage_unavailable",
        "payment_not_held",
        "capture_exceeds_authorization",
    ] {
        assert!(codes.contains(code), "{code} was not found in error.rs");
    }
    let mut documented = BTreeSet::new();
    documented_codes(&doc, &mut documented);
    let missing: Vec<_> = codes.difference(&documented).collect();
    assert!(missing.is_empty(), "codes not in the document: {missing:?}");
    let text = farthing_server::openapi_json();
    for code in &codes {
        assert!(
            text.contains(&format!("`{code}`")),
            "{code} is not described"
        );
    }
}

#[test]
fn every_error_response_is_a_problem_with_a_code_for_its_status() {
    let doc = document();
    for (path, method, operation) in operations(&doc) {
        let responses = operation["responses"].as_object().expect("responses");
        for (status, response) in responses {
            let numeric: u16 = status.parse().expect("statuses are numeric");
            if numeric < 400 {
                continue;
            }
            let response = resolve(&doc, response);
            let content = &response["content"]["application/problem+json"];
            let schema = &content["schema"];
            assert!(
                schema.to_string().contains("#/components/schemas/Problem"),
                "{method} {path} {status} is not a Problem"
            );
            let status_const = schema["allOf"][1]["properties"]["status"]["const"].as_u64();
            assert_eq!(
                status_const,
                Some(u64::from(numeric)),
                "{method} {path} {status} pins another status"
            );
            let mut codes = BTreeSet::new();
            documented_codes(schema, &mut codes);
            assert!(!codes.is_empty(), "{method} {path} {status} names no code");
        }
    }
}

#[test]
fn every_post_takes_an_idempotency_key_and_says_when_it_replayed() {
    let doc = document();
    let mut posts = 0;
    for (path, method, operation) in operations(&doc) {
        if method != "post" {
            continue;
        }
        posts += 1;
        let parameters = operation["parameters"].as_array().expect("parameters");
        assert!(
            parameters.iter().any(|p| {
                let p = resolve(&doc, p);
                p["name"] == "Idempotency-Key" && p["in"] == "header"
            }),
            "POST {path} does not take Idempotency-Key"
        );
        let success = operation["responses"]
            .as_object()
            .expect("responses")
            .iter()
            .find(|(status, _)| status.starts_with('2'))
            .map(|(_, response)| resolve(&doc, response))
            .expect("a success response");
        assert!(
            success["headers"]["Idempotent-Replayed"].is_object(),
            "POST {path} does not document Idempotent-Replayed"
        );
    }
    assert!(posts >= 6);
    let key = &doc["components"]["parameters"]["IdempotencyKey"]["description"];
    let key = key.as_str().expect("described");
    for phrase in [
        "idempotency_key_reused",
        "24 hours",
        "Idempotent-Replayed: true",
    ] {
        assert!(
            key.contains(phrase),
            "Idempotency-Key does not mention {phrase}"
        );
    }
}

#[test]
fn every_v1_route_and_metrics_need_a_bearer_key_and_the_other_system_routes_need_none() {
    let doc = document();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    assert_eq!(doc["security"][0]["bearerAuth"], serde_json::json!([]));
    for (path, method, operation) in operations(&doc) {
        if path.starts_with("/v1/") || path == "/metrics" {
            assert!(
                operation.get("security").is_none(),
                "{method} {path} overrides the bearer requirement"
            );
            assert!(
                operation["responses"]["401"].is_object(),
                "{method} {path} does not document 401"
            );
            let description = operation["description"].as_str().unwrap_or_default();
            assert!(
                path == "/metrics" || description.starts_with("**Keys:**"),
                "{method} {path} does not say which keys it takes"
            );
        } else {
            assert_eq!(
                operation["security"],
                serde_json::json!([]),
                "{method} {path} should need no key"
            );
        }
    }
}

#[test]
fn list_routes_take_a_limit_from_1_to_100_defaulting_to_10_and_a_cursor() {
    let doc = document();
    let mut lists = 0;
    for (path, method, operation) in operations(&doc) {
        let Some(parameters) = operation["parameters"].as_array() else {
            continue;
        };
        let parameters: Vec<&Value> = parameters.iter().map(|p| resolve(&doc, p)).collect();
        let Some(limit) = parameters.iter().find(|p| p["name"] == "limit") else {
            continue;
        };
        lists += 1;
        assert_eq!(limit["in"], "query");
        assert_eq!(limit["schema"]["minimum"], 1, "{method} {path}");
        assert_eq!(limit["schema"]["maximum"], 100, "{method} {path}");
        assert_eq!(limit["schema"]["default"], 10, "{method} {path}");
        assert!(
            parameters
                .iter()
                .any(|p| p["name"] == "starting_after" && p["in"] == "query"),
            "{method} {path} has no starting_after"
        );
        let ok = resolve(&doc, &operation["responses"]["200"]);
        let list = resolve(&doc, &ok["content"]["application/json"]["schema"]);
        for field in ["object", "data", "has_more"] {
            assert!(
                list["required"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|f| f == field)),
                "{method} {path}: a list without {field}"
            );
        }
    }
    assert_eq!(
        lists, 2,
        "GET /v1/payments and GET /v1/payers/{{id}}/transactions"
    );
}

#[test]
fn request_bodies_refuse_unknown_fields_like_the_code_does() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    for name in [
        "CreateMerchantRequest",
        "CreatePayerRequest",
        "CreateTopupRequest",
        "CreatePaymentRequest",
        "BatchPaymentsRequest",
        "BatchPaymentItem",
        "CreateRefundRequest",
    ] {
        assert_eq!(
            schemas[name]["additionalProperties"],
            Value::Bool(false),
            "{name}"
        );
    }
}
