//! Generates the client from the checked-in OpenAPI document with progenitor, as a user of
//! the API would: the document, not the dispatcher's code, is the input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

fn main() {
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    println!("cargo:rerun-if-changed={}", document.display());
    let text = std::fs::read_to_string(&document)
        .unwrap_or_else(|e| panic!("reading {}: {e}", document.display()));
    let mut document_json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", document.display()));
    drop_nullable_from_optional_headers(&mut document_json);
    let spec: openapiv3::OpenAPI = serde_json::from_value(document_json)
        .unwrap_or_else(|e| panic!("{} is not an OpenAPI 3.0 document: {e}", document.display()));
    let tokens = progenitor::Generator::default()
        .generate_tokens(&spec)
        .unwrap_or_else(|e| {
            panic!(
                "progenitor cannot generate a client from {}: {e}",
                document.display()
            )
        });
    let file: syn::File = syn::parse2(tokens).expect("progenitor's output parses");
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("client.rs");
    std::fs::write(out, prettyplease::unparse(&file)).expect("writing the client");
}

/// Workaround for progenitor 0.15 (the newest on crates.io): an optional (`required:
/// false`) header parameter whose schema is also `nullable` becomes an
/// `Option<Option<&T>>` argument, and the generated code calls `to_string()` on the inner
/// `Option`, which does not compile. progenitor's authors fixed it on the document side
/// instead (oxidecomputer/dropshot#1328, "Header parameters may not be null/nullable":
/// OpenAPI 3.0.3 says absence is `required: false`, and a header has no `null`). utoipa
/// still writes `nullable` for our `Option<String>` Idempotency-Key, so this drops it from
/// the copy progenitor reads, and only there. Remove it once the served document stops
/// marking optional headers `nullable`.
fn drop_nullable_from_optional_headers(document: &mut serde_json::Value) {
    let Some(paths) = document
        .get_mut("paths")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    for operation in paths
        .values_mut()
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|item| item.values_mut())
    {
        let Some(parameters) = operation
            .get_mut("parameters")
            .and_then(serde_json::Value::as_array_mut)
        else {
            continue;
        };
        for parameter in parameters {
            let is_optional_header = parameter.get("in").and_then(serde_json::Value::as_str)
                == Some("header")
                && parameter
                    .get("required")
                    .and_then(serde_json::Value::as_bool)
                    != Some(true);
            if let (true, Some(schema)) = (
                is_optional_header,
                parameter
                    .get_mut("schema")
                    .and_then(serde_json::Value::as_object_mut),
            ) {
                schema.remove("nullable");
            }
        }
    }
}
