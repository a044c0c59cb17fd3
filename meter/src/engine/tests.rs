use super::*;
use serde_json::json;

fn meter(yaml: &str) -> Result<CompiledMeter, Vec<SpecError>> {
    let m: Meter = serde_yaml::from_str(yaml).unwrap();
    CompiledMeter::compile(&m)
}

fn event(data: Value) -> UsageEvent {
    UsageEvent::from_json(
        &json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "acme",
                "time": "2024-01-01T00:00:00Z", "data": data}),
        0,
    )
    .unwrap()
}

const HEAD: &str =
    "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: m}\nspec:\n  eventType: t\n";

#[test]
fn spec_errors_name_their_fields() {
    let errs = meter(&format!("{HEAD}  aggregation: COUNT\n  valueProperty: $.x\n  groupBy: {{subject: $.a, ok: '$.b[*]'}}\n  filter: [{{property: $.c, operator: gt, values: [abc]}}, {{property: $.d, operator: exists, values: [x]}}]\n")).unwrap_err();
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.valueProperty",
            "spec.groupBy.ok",
            "spec.groupBy.subject",
            "spec.filter[0].values",
            "spec.filter[1].values"
        ]
    );
    let errs = meter(&format!("{HEAD}  aggregation: SUM\n")).unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "spec.valueProperty: is required for SUM"
    );
}

#[test]
fn values_are_numbers_or_numeric_strings_and_bad_ones_are_per_meter_errors() {
    let m = meter(&format!("{HEAD}  aggregation: SUM\n  valueProperty: $.n\n")).unwrap();
    let value = |d: Value| m.evaluate(&event(d)).map(|c| c.map(|c| c.input));
    assert_eq!(value(json!({"n": 2.5})), Ok(Some(Input::Number(2.5))));
    assert_eq!(value(json!({"n": " 7 "})), Ok(Some(Input::Number(7.0))));
    for bad in [
        json!({}),
        json!({"n": null}),
        json!({"n": "x"}),
        json!({"n": "NaN"}),
        json!({"n": "inf"}),
        json!({"n": [1]}),
        json!({"n": true}),
    ] {
        assert!(value(bad.clone()).is_err(), "{bad}");
    }
}

#[test]
fn group_by_values_are_canonical_strings() {
    let m = meter(&format!(
        "{HEAD}  aggregation: COUNT\n  groupBy: {{a: $.a, b: '$.b[0]'}}\n"
    ))
    .unwrap();
    let groups = |d: Value| m.evaluate(&event(d)).map(|c| c.unwrap().groups);
    assert_eq!(
        groups(json!({"a": 1.0, "b": [true]})),
        Ok(vec![Some("1".into()), Some("true".into())])
    );
    assert_eq!(groups(json!({"a": "x"})), Ok(vec![Some("x".into()), None]));
    assert!(
        groups(json!({"a": {"nested": 1}}))
            .unwrap_err()
            .contains("groupBy a")
    );
}

#[test]
fn filters_follow_the_documented_semantics() {
    let check = |cond: &str, data: Value| {
        let m = meter(&format!("{HEAD}  aggregation: COUNT\n  filter: [{cond}]\n")).unwrap();
        m.evaluate(&event(data)).unwrap().is_some()
    };
    assert!(check(
        "{property: $.s, operator: eq, values: [200]}",
        json!({"s": 200})
    ));
    assert!(check(
        "{property: $.s, operator: eq, values: ['200']}",
        json!({"s": "200"})
    ));
    assert!(!check(
        "{property: $.s, operator: eq, values: [200]}",
        json!({"s": 201})
    ));
    assert!(check(
        "{property: $.s, operator: ne, values: [200]}",
        json!({})
    ));
    assert!(check(
        "{property: $.s, operator: in, values: [a, b]}",
        json!({"s": "b"})
    ));
    assert!(!check(
        "{property: $.s, operator: notIn, values: [a, b]}",
        json!({"s": "a"})
    ));
    assert!(check(
        "{property: $.s, operator: notIn, values: [a]}",
        json!({"s": null})
    ));
    assert!(check("{property: $.s, operator: exists}", json!({"s": 0})));
    assert!(!check(
        "{property: $.s, operator: exists}",
        json!({"s": null})
    ));
    assert!(check(
        "{property: $.s, operator: gt, values: [1.5]}",
        json!({"s": 2})
    ));
    assert!(check(
        "{property: $.s, operator: gte, values: [2]}",
        json!({"s": "2"})
    ));
    assert!(!check(
        "{property: $.s, operator: lt, values: [2]}",
        json!({"s": "abc"})
    ));
    assert!(check(
        "{property: $.s, operator: lte, values: [2]}",
        json!({"s": 2.0})
    ));
}

#[test]
fn event_from_excludes_earlier_events() {
    let m = meter(&format!(
        "{HEAD}  aggregation: COUNT\n  eventFrom: 2024-01-01T00:00:00.001Z\n"
    ))
    .unwrap();
    assert_eq!(m.evaluate(&event(json!({}))), Ok(None));
}
