//! Structural OpenAPI v3 validation of custom resources, pruning of unknown fields, and
//! the CRD's CEL rules (`x-kubernetes-validations`), as the API server applies them on
//! create, update and patch.
//!
//! Checked: `type` (with `nullable` and `x-kubernetes-int-or-string`), `required`,
//! `enum`, `pattern`, `minLength`/`maxLength`, `minimum`/`maximum`,
//! `minItems`/`maxItems`, `minProperties`/`maxProperties`, `properties`,
//! `additionalProperties`, `items`, `allOf`/`anyOf`/`oneOf`/`not`.
//! Unknown fields are pruned (or rejected with `fieldValidation=Strict`) unless
//! `x-kubernetes-preserve-unknown-fields` is set. CEL rules are evaluated with the `cel`
//! crate, `self` bound to the node's value and, for transition rules (those naming
//! `oldSelf`), `oldSelf` bound to the old object's value at the same path; as in the
//! real server, transition rules are skipped on create and inside arrays.
//! Not checked: `format` (date-time, …), `x-kubernetes-list-type` uniqueness, CEL cost
//! limits, `messageExpression`.
use serde_json::{Map, Value};

/// One invalid field: a `details.causes` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    /// The field path, e.g. `spec.groupBy`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// `FieldValueInvalid`, `FieldValueRequired`, … as the real server names them.
    pub reason: &'static str,
}

/// Validates `obj` (a whole custom resource) against `schema` (the version's
/// `openAPIV3Schema`), pruning unknown fields in place. `old` is the stored object on
/// updates. With `strict`, unknown fields are errors instead of pruned.
pub fn validate(schema: &Value, obj: &mut Value, old: Option<&Value>, strict: bool) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(root) = obj.as_object_mut() else {
        causes.push(cause("", "must be an object", "FieldValueTypeInvalid"));
        return causes;
    };
    // apiVersion, kind and metadata are the server's own; validate the rest.
    let props = schema.get("properties").and_then(Value::as_object);
    let keys: Vec<String> = root.keys().cloned().collect();
    for key in keys {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&key)) {
            Some(sub) => {
                let old_v = old.and_then(|o| o.get(&key));
                let v = root.get_mut(&key).expect("key listed above");
                check(sub, v, old_v, &key, strict, &mut causes);
            }
            None if preserves(schema) => {}
            None if strict => causes.push(cause(
                &key,
                "field not declared in schema",
                "FieldValueNotSupported",
            )),
            None => {
                root.remove(&key);
            }
        }
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !root.contains_key(r) {
                causes.push(cause(r, "Required value", "FieldValueRequired"));
            }
        }
    }
    rules(schema, obj, old, "", false, &mut causes);
    causes
}

fn preserves(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
}

fn cause(field: &str, message: &str, reason: &'static str) -> Cause {
    Cause {
        field: field.to_string(),
        message: message.to_string(),
        reason,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(schema: &Value, v: &Value) -> bool {
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        return matches!(type_name(v), "integer" | "string");
    }
    match schema.get("type").and_then(Value::as_str) {
        None => true,
        Some("number") => v.is_number(),
        Some(t) => t == type_name(v),
    }
}

/// Checks one node and its children (everything but CEL rules).
fn check(
    schema: &Value,
    v: &mut Value,
    old: Option<&Value>,
    path: &str,
    strict: bool,
    causes: &mut Vec<Cause>,
) {
    if v.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            // The real server drops nulls of non-nullable fields during pruning/defaulting.
            causes.push(cause(
                path,
                "Invalid value: \"null\": must not be null",
                "FieldValueTypeInvalid",
            ));
        }
        return;
    }
    if !type_ok(schema, v) {
        let want = schema
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("int-or-string");
        causes.push(cause(
            path,
            &format!(
                "Invalid value: \"{}\": {path} in body must be of type {want}: \"{}\"",
                type_name(v),
                type_name(v)
            ),
            "FieldValueTypeInvalid",
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        causes.push(cause(
            path,
            &format!(
                "Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ),
            "FieldValueNotSupported",
        ));
    }
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    match &*v {
        Value::String(s) => {
            let len = s.chars().count() as f64;
            if num("minLength").is_some_and(|m| len < m) {
                causes.push(cause(
                    path,
                    &format!(
                        "Invalid value: {v}: {path} in body should be at least {} chars long",
                        num("minLength").unwrap_or_default()
                    ),
                    "FieldValueInvalid",
                ));
            }
            if num("maxLength").is_some_and(|m| len > m) {
                causes.push(cause(
                    path,
                    &format!(
                        "Too long: may not be more than {} bytes",
                        num("maxLength").unwrap_or_default()
                    ),
                    "FieldValueTooLong",
                ));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(p) {
                    Ok(re) if !re.is_match(s) => causes.push(cause(
                        path,
                        &format!("Invalid value: {v}: {path} in body should match '{p}'"),
                        "FieldValueInvalid",
                    )),
                    Ok(_) => {}
                    Err(e) => causes.push(cause(
                        path,
                        &format!("schema pattern does not compile: {e}"),
                        "InternalError",
                    )),
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or_default();
            if num("minimum").is_some_and(|m| x < m) {
                causes.push(cause(
                    path,
                    &format!(
                        "Invalid value: {x}: {path} in body should be greater than or equal to {}",
                        num("minimum").unwrap_or_default()
                    ),
                    "FieldValueInvalid",
                ));
            }
            if num("maximum").is_some_and(|m| x > m) {
                causes.push(cause(
                    path,
                    &format!(
                        "Invalid value: {x}: {path} in body should be less than or equal to {}",
                        num("maximum").unwrap_or_default()
                    ),
                    "FieldValueInvalid",
                ));
            }
        }
        _ => {}
    }
    match v {
        Value::Array(items) => {
            let n = items.len() as f64;
            if num("minItems").is_some_and(|m| n < m) {
                causes.push(cause(
                    path,
                    &format!(
                        "Invalid value: {n}: {path} in body should have at least {} items",
                        num("minItems").unwrap_or_default()
                    ),
                    "FieldValueInvalid",
                ));
            }
            if num("maxItems").is_some_and(|m| n > m) {
                causes.push(cause(
                    path,
                    &format!(
                        "Too many: {n}: must have at most {} items",
                        num("maxItems").unwrap_or_default()
                    ),
                    "FieldValueTooMany",
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check(
                        item_schema,
                        item,
                        None,
                        &format!("{path}[{i}]"),
                        strict,
                        causes,
                    );
                }
            }
        }
        Value::Object(map) => check_object(schema, map, old, path, strict, causes),
        _ => {}
    }
    for (key, all) in [("allOf", true), ("anyOf", false), ("oneOf", false)] {
        if let Some(subs) = schema.get(key).and_then(Value::as_array) {
            let results: Vec<bool> = subs
                .iter()
                .map(|s| {
                    let mut copy = v.clone();
                    let mut c = Vec::new();
                    check_no_prune(s, &mut copy, path, &mut c);
                    c.is_empty()
                })
                .collect();
            let passed = results.iter().filter(|r| **r).count();
            let ok = match key {
                "allOf" => passed == results.len(),
                "anyOf" => passed >= 1,
                _ => passed == 1,
            };
            if !ok {
                let how = if all {
                    "all"
                } else if key == "anyOf" {
                    "any"
                } else {
                    "exactly one"
                };
                causes.push(cause(
                    path,
                    &format!("Invalid value: {path} must match {how} of the schemas in {key}"),
                    "FieldValueInvalid",
                ));
            }
        }
    }
    if let Some(not) = schema.get("not") {
        let mut copy = v.clone();
        let mut c = Vec::new();
        check_no_prune(not, &mut copy, path, &mut c);
        if c.is_empty() {
            causes.push(cause(
                path,
                &format!("Invalid value: {path} must not validate the schema (not)"),
                "FieldValueForbidden",
            ));
        }
    }
}

/// `anyOf`/`oneOf` branches only validate; they never prune (structural schema rule).
fn check_no_prune(schema: &Value, v: &mut Value, path: &str, causes: &mut Vec<Cause>) {
    let mut schema = schema.clone();
    if let Some(o) = schema.as_object_mut() {
        o.insert(
            "x-kubernetes-preserve-unknown-fields".into(),
            Value::Bool(true),
        );
    }
    check(&schema, v, None, path, false, causes);
}

fn check_object(
    schema: &Value,
    map: &mut Map<String, Value>,
    old: Option<&Value>,
    path: &str,
    strict: bool,
    causes: &mut Vec<Cause>,
) {
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    let n = map.len() as f64;
    if num("minProperties").is_some_and(|m| n < m) {
        causes.push(cause(
            path,
            &format!(
                "Invalid value: {path} should have at least {} properties",
                num("minProperties").unwrap_or_default()
            ),
            "FieldValueInvalid",
        ));
    }
    if num("maxProperties").is_some_and(|m| n > m) {
        causes.push(cause(
            path,
            &format!(
                "Too many: {n}: must have at most {} items",
                num("maxProperties").unwrap_or_default()
            ),
            "FieldValueTooMany",
        ));
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                causes.push(cause(
                    &join(path, r),
                    "Required value",
                    "FieldValueRequired",
                ));
            }
        }
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let sub = props.and_then(|p| p.get(&key)).or(match additional {
            Some(Value::Object(_)) => additional,
            _ => None,
        });
        let child_path = join(path, &key);
        match sub {
            Some(sub) => {
                let old_v = old.and_then(|o| o.get(&key));
                let v = map.get_mut(&key).expect("key listed above");
                check(sub, v, old_v, &child_path, strict, causes);
            }
            None if preserves(schema) || additional == Some(&Value::Bool(true)) => {}
            None if props.is_none() && additional.is_none() => {}
            None if strict => causes.push(cause(
                &child_path,
                "field not declared in schema",
                "FieldValueNotSupported",
            )),
            None => {
                map.remove(&key);
            }
        }
    }
}

/// Evaluates the CEL rules of `schema` and its descendants against `v`.
fn rules(
    schema: &Value,
    v: &Value,
    old: Option<&Value>,
    path: &str,
    in_array: bool,
    causes: &mut Vec<Cause>,
) {
    if v.is_null() {
        return;
    }
    if let Some(list) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in list {
            let Some(expr) = rule.get("rule").and_then(Value::as_str) else {
                continue;
            };
            let transition = expr.contains("oldSelf");
            if transition && (old.is_none() || in_array) {
                continue;
            }
            let message = rule
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("failed rule: {expr}"));
            match eval(expr, v, old) {
                Ok(true) => {}
                Ok(false) => causes.push(cause(
                    if path.is_empty() { "<root>" } else { path },
                    &format!("Invalid value: \"{}\": {message}", type_name(v)),
                    "FieldValueInvalid",
                )),
                Err(e) => causes.push(cause(
                    path,
                    &format!(
                        "Invalid value: \"{}\": rule {expr:?} could not be evaluated: {e}",
                        type_name(v)
                    ),
                    "FieldValueInvalid",
                )),
            }
        }
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(key)).or(additional) {
                    rules(
                        sub,
                        child,
                        old.and_then(|o| o.get(key)),
                        &join(path, key),
                        in_array,
                        causes,
                    );
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    rules(sub, item, None, &format!("{path}[{i}]"), true, causes);
                }
            }
        }
        _ => {}
    }
}

/// Evaluates one rule to a boolean.
pub fn eval(expr: &str, this: &Value, old: Option<&Value>) -> Result<bool, String> {
    let program = cel::Program::compile(expr).map_err(|e| format!("{e}"))?;
    let mut ctx = cel::Context::default();
    ctx.add_variable("self", cel::to_value(this).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{e:?}"))?;
    if let Some(old) = old {
        ctx.add_variable("oldSelf", cel::to_value(old).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{e:?}"))?;
    }
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("the rule returned {other:?}, not a boolean")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {"spec": {
            "type": "object", "required": ["mode"],
            "properties": {
                "mode": {"type": "string", "enum": ["A", "B"]},
                "slug": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                "n": {"type": "integer", "minimum": 1},
                "tags": {"type": "object", "additionalProperties": {"type": "string"},
                         "x-kubernetes-validations": [{"rule": "self.all(k, k != 'subject')", "message": "no subject"}]}
            },
            "x-kubernetes-validations": [
                {"rule": "self.mode == oldSelf.mode", "message": "mode is immutable"},
                {"rule": "self.mode == 'A' ? !has(self.n) : has(self.n)", "message": "n iff B"}
            ]
        }}})
    }

    #[test]
    fn schema_checks_types_enums_patterns_and_prunes_unknown_fields() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {}, "spec": {"mode": "B", "n": 2, "junk": 1}, "extra": true});
        assert_eq!(validate(&schema(), &mut obj, None, false), vec![]);
        assert_eq!(obj["spec"].get("junk"), None);
        assert_eq!(obj.get("extra"), None);
        let mut bad = json!({"spec": {"mode": "C", "slug": "Bad!", "n": 0}});
        let fields: Vec<String> = validate(&schema(), &mut bad, None, false)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(fields, ["spec.mode", "spec.n", "spec.slug"]);
        let mut strict = json!({"spec": {"mode": "A", "junk": 1}});
        assert_eq!(
            validate(&schema(), &mut strict, None, true)[0].field,
            "spec.junk"
        );
        let mut missing = json!({"spec": {}});
        assert_eq!(
            validate(&schema(), &mut missing, None, false)[0].reason,
            "FieldValueRequired"
        );
    }

    #[test]
    fn cel_rules_see_self_and_old_self() {
        let old = json!({"spec": {"mode": "A"}});
        let mut new = json!({"spec": {"mode": "B", "n": 1, "tags": {"subject": "x"}}});
        let causes = validate(&schema(), &mut new, Some(&old), false);
        let msgs: Vec<&str> = causes.iter().map(|c| c.message.as_str()).collect();
        assert!(
            msgs.iter().any(|m| m.ends_with("mode is immutable")),
            "{msgs:?}"
        );
        assert!(msgs.iter().any(|m| m.ends_with("no subject")), "{msgs:?}");
        // Transition rules do not run on create.
        let mut created = json!({"spec": {"mode": "B", "n": 1}});
        assert_eq!(validate(&schema(), &mut created, None, false), vec![]);
    }
}
