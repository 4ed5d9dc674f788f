//! The OpenAPI document against the route table (both directions, references, links), and
//! against the router itself: the document served at its path lists every route the router
//! answers, and the router answers every route it lists.

use std::collections::BTreeSet;

use crate::api::{OPENAPI, route_table};

fn documented() -> BTreeSet<(String, String)> {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
        .collect()
}

#[test]
fn every_route_is_in_the_openapi_document_and_every_documented_route_exists() {
    let served: BTreeSet<(String, String)> = route_table().into_iter().map(|(m, p)| (m.to_owned(), p)).collect();
    let documented = documented();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "routes missing from openapi.json: {undocumented:?}");
    assert!(phantom.is_empty(), "openapi.json documents routes the server does not have: {phantom:?}");
}

#[test]
fn every_reference_resolves() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let mut refs = 0;
    for part in OPENAPI.split("\"$ref\": \"#/").skip(1) {
        let pointer = format!("/{}", part.split('"').next().unwrap());
        assert!(doc.pointer(&pointer).is_some(), "dangling $ref #{pointer}");
        refs += 1;
    }
    assert!(refs > 100, "only {refs} references");
}

/// Links (which the stateful API tests follow) name operations that exist, by parameters
/// those operations have.
#[test]
fn every_link_names_an_operation_and_its_parameters() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let resolve = |p: &serde_json::Value| match p["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap().clone(),
        None => p.clone(),
    };
    let mut params: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    let mut links = Vec::new();
    for item in doc["paths"].as_object().unwrap().values() {
        let shared: Vec<serde_json::Value> = item["parameters"].as_array().cloned().unwrap_or_default();
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let own = op["parameters"].as_array().cloned().unwrap_or_default();
            let names = shared.iter().chain(&own).map(|p| resolve(p)["name"].as_str().unwrap().to_owned()).collect();
            let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} without operationId")).to_owned();
            assert!(params.insert(id.clone(), names).is_none(), "operationId {id} twice");
            for response in op["responses"].as_object().unwrap().values() {
                for link in response["links"].as_object().into_iter().flat_map(|l| l.values()) {
                    links.push(link.clone());
                }
            }
        }
    }
    assert!(links.len() >= 6, "only {} links", links.len());
    for link in links {
        let target = link["operationId"].as_str().unwrap();
        let names = params.get(target).unwrap_or_else(|| panic!("a link to {target}, which does not exist"));
        for name in link["parameters"].as_object().unwrap().keys() {
            assert!(names.contains(name), "a link gives {target} a parameter {name} it does not have");
        }
    }
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The document as the server serves it, without a token.
async fn served_document(app: &crate::testing::TestApp) -> serde_json::Value {
    let reply = app.get("/api/v1/openapi.json", None).await;
    assert_eq!(reply.status, axum::http::StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    reply.json()
}

/// A request to a route with a well-formed id in its path, and `{}` as the body if it takes one.
fn probe(method: &str, path: &str, token: &str) -> axum::http::Request<axum::body::Body> {
    let path = path.replace("{id}", "0123456789abcdef");
    let method: axum::http::Method = method.to_uppercase().parse().unwrap();
    let body =
        matches!(method, axum::http::Method::POST | axum::http::Method::PATCH | axum::http::Method::PUT).then(|| serde_json::json!({}));
    crate::testing::request(method, &path, Some(token), body)
}

/// What the router answered: the status and, unless it is a stream, the body.
async fn answer(app: &crate::testing::TestApp, req: axum::http::Request<axum::body::Body>) -> (axum::http::StatusCode, String) {
    use http_body_util::BodyExt;
    let resp = app.respond(req).await;
    let status = resp.status();
    let streaming = resp.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streaming {
        return (status, String::new());
    }
    let body = tokio::time::timeout(std::time::Duration::from_secs(10), resp.into_body().collect()).await.unwrap().unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_served_document_is_the_compiled_one_and_parses() {
    let app = crate::testing::TestApp::new().await;
    let served = served_document(&app).await;
    assert_eq!(served, serde_json::from_str::<serde_json::Value>(OPENAPI).unwrap());
    assert!(served["paths"].as_object().is_some_and(|p| p.len() > 20));
}

/// The router is asked for every documented operation: none falls through to "no route" or
/// 405, so the route table and the router built from it agree with the document.
#[tokio::test]
async fn the_router_answers_every_operation_the_served_document_lists() {
    let app = crate::testing::TestApp::new().await;
    let admin = app.token(shared::api::Role::Admin).await;
    let doc = served_document(&app).await;
    let mut asked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys().filter(|m| METHODS.contains(&m.as_str())) {
            let (status, body) = answer(&app, probe(method, path, &admin)).await;
            assert_ne!(status, axum::http::StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {body}");
            assert!(!body.contains("no route for"), "{method} {path} is documented but not routed: {status} {body}");
            asked += 1;
        }
    }
    assert_eq!(asked, route_table().len());
}

/// ... and nothing more: a method the document does not list for a path is refused, and a
/// path it does not list is the API's JSON 404.
#[tokio::test]
async fn the_router_serves_no_operation_the_served_document_leaves_out() {
    let app = crate::testing::TestApp::new().await;
    let admin = app.token(shared::api::Role::Admin).await;
    let doc = served_document(&app).await;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let ops = ops.as_object().unwrap();
        for method in METHODS.iter().filter(|m| !ops.contains_key(**m)) {
            let (status, body) = answer(&app, probe(method, path, &admin)).await;
            assert_eq!(status, axum::http::StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is served but not documented: {body}");
        }
    }
    let reply = app.get("/api/v1/nothing-here", Some(&admin)).await;
    let message = reply.error(axum::http::StatusCode::NOT_FOUND, "not_found");
    assert!(message.contains("/api/v1/nothing-here"), "{message}");
}
