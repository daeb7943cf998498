"""Schemathesis hooks of `openapi::schemathesis_finds_nothing_against_the_served_document`.

OpenAPI 3.0 has no `propertyNames`, so the document states the rule for the keys of a map
(environment variable names, a secret's keys) as the extension `x-propertyNames`, with
JSON Schema's meaning. This hook hands it to Schemathesis under its JSON Schema name, so
the maps it generates have keys the API takes. Nothing else is changed.
"""

import schemathesis


def _property_names(node):
    if isinstance(node, dict):
        if "x-propertyNames" in node:
            node["propertyNames"] = node["x-propertyNames"]
        for value in node.values():
            _property_names(value)
    elif isinstance(node, list):
        for value in node:
            _property_names(value)


@schemathesis.hook
def before_load_schema(context, raw_schema):
    _property_names(raw_schema)
