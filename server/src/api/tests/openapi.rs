//! The OpenAPI document against the route table (both directions, references, links).

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
