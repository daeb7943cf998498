"""Schemathesis hooks of `openapi::schemathesis_finds_nothing_against_the_served_document`.

OpenAPI 3.0 cannot constrain the keys of a map, so the document states the rule for them
(environment variable names, a secret's keys) as the extension `x-propertyNames`, with
JSON Schema's meaning. Schemathesis reads a 3.0 document with the Draft 4 validator,
which has no `propertyNames`, so:

- `before_load_schema` hands the rule to its generators under the JSON Schema name, so
  the maps they draw have keys the API takes;
- `filter_case` drops the positive cases some phases (coverage) still draw with other
  keys: by the document's own rule they are not valid requests, and the API refuses
  them with a 422 naming the key. Negative cases are kept.

Nothing else is changed.
"""

import re

import schemathesis

# (METHOD, path) -> {body property: its x-propertyNames rule}
_KEY_RULES = {}


def _property_names(node):
    if isinstance(node, dict):
        if "x-propertyNames" in node:
            node["propertyNames"] = node["x-propertyNames"]
        for value in node.values():
            _property_names(value)
    elif isinstance(node, list):
        for value in node:
            _property_names(value)


def _collect_key_rules(raw_schema):
    schemas = raw_schema.get("components", {}).get("schemas", {})
    for path, item in raw_schema.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict):
                continue
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            name = body.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
            properties = schemas.get(name, {}).get("properties", {})
            rules = {
                field: schema["x-propertyNames"]
                for field, schema in properties.items()
                if isinstance(schema, dict) and "x-propertyNames" in schema
            }
            if rules:
                _KEY_RULES[(method.upper(), path)] = rules


def _key_allowed(key, rule):
    if not isinstance(key, str):
        return False
    if len(key) < rule.get("minLength", 0) or len(key) > rule.get("maxLength", len(key)):
        return False
    # ECMA-262's `$` is the end of the text; Python's would also match before a final "\n".
    pattern = rule.get("pattern")
    return pattern is None or re.search(pattern.replace("$", r"\Z"), key) is not None


@schemathesis.hook
def before_load_schema(context, raw_schema):
    _collect_key_rules(raw_schema)
    _property_names(raw_schema)


@schemathesis.hook
def filter_case(context, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    rules = _KEY_RULES.get((case.method.upper(), case.path))
    if not rules or not isinstance(case.body, dict):
        return True
    for field, rule in rules.items():
        value = case.body.get(field)
        if isinstance(value, dict) and not all(_key_allowed(key, rule) for key in value):
            return False
    return True
