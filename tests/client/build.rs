//! Generates the client from the checked-in OpenAPI document with progenitor, as a user of
//! the API would: the document, not the dispatcher's code, is the input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

fn main() {
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    println!("cargo:rerun-if-changed={}", document.display());
    let text = std::fs::read_to_string(&document)
        .unwrap_or_else(|e| panic!("reading {}: {e}", document.display()));
    let spec: openapiv3::OpenAPI = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not an OpenAPI 3.0 document: {e}", document.display()));
    let tokens = progenitor::Generator::default()
        .generate_tokens(&spec)
        .unwrap_or_else(|e| panic!("progenitor cannot generate a client from {}: {e}", document.display()));
    let file: syn::File = syn::parse2(tokens).expect("progenitor's output parses");
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("client.rs");
    std::fs::write(out, prettyplease::unparse(&file)).expect("writing the client");
}
