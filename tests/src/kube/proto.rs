//! Just enough of the Kubernetes protobuf encoding to accept the requests client-go
//! sends as `application/vnd.kubernetes.protobuf` for Secrets (Helm keeps its release
//! records in them): the `k8s\0` envelope (`runtime.Unknown`), and a Secret's
//! metadata (name, generateName, namespace, resourceVersion, labels, annotations,
//! finalizers), `data`, `stringData`, `type` and `immutable`. Everything is decoded
//! into the JSON the rest of the kit stores; responses stay JSON, which client-go
//! accepts.
use serde_json::{Map, Value, json};

/// One field of a protobuf message: its number and its value.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at).ok_or("truncated varint")?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let key = varint(buf, &mut at)?;
        let (number, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Field::Varint(varint(buf, &mut at)?),
            2 => {
                let len = varint(buf, &mut at)? as usize;
                let end = at
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or("truncated field")?;
                let bytes = &buf[at..end];
                at = end;
                Field::Bytes(bytes)
            }
            1 => {
                at += 8;
                Field::Varint(0)
            }
            5 => {
                at += 4;
                Field::Varint(0)
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        out.push((number, value));
    }
    Ok(out)
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|e| e.to_string())
}

/// A `map<string, T>` entry: key 1, value 2.
fn entry(b: &[u8]) -> Result<(String, &[u8]), String> {
    let (mut k, mut v) = (String::new(), &[][..]);
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => k = text(x)?,
            (2, Field::Bytes(x)) => v = x,
            _ => {}
        }
    }
    Ok((k, v))
}

fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut meta = Map::new();
    let (mut labels, mut annotations, mut finalizers) = (Map::new(), Map::new(), Vec::new());
    for (n, f) in fields(b)? {
        let Field::Bytes(x) = f else { continue };
        match n {
            1 => drop(meta.insert("name".into(), text(x)?.into())),
            2 => drop(meta.insert("generateName".into(), text(x)?.into())),
            3 => drop(meta.insert("namespace".into(), text(x)?.into())),
            6 => drop(meta.insert("resourceVersion".into(), text(x)?.into())),
            11 => {
                let (k, v) = entry(x)?;
                labels.insert(k, text(v)?.into());
            }
            12 => {
                let (k, v) = entry(x)?;
                annotations.insert(k, text(v)?.into());
            }
            14 => finalizers.push(Value::from(text(x)?)),
            _ => {}
        }
    }
    if !labels.is_empty() {
        meta.insert("labels".into(), labels.into());
    }
    if !annotations.is_empty() {
        meta.insert("annotations".into(), annotations.into());
    }
    if !finalizers.is_empty() {
        meta.insert("finalizers".into(), finalizers.into());
    }
    Ok(meta.into())
}

fn secret(b: &[u8]) -> Result<Value, String> {
    let mut s = json!({"apiVersion": "v1", "kind": "Secret"});
    let (mut data, mut strings) = (Map::new(), Map::new());
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => s["metadata"] = object_meta(x)?,
            (2, Field::Bytes(x)) => {
                let (k, v) = entry(x)?;
                let encoded = serde_json::to_value(k8s_openapi::ByteString(v.to_vec()))
                    .map_err(|e| e.to_string())?;
                data.insert(k, encoded);
            }
            (3, Field::Bytes(x)) => s["type"] = text(x)?.into(),
            (4, Field::Bytes(x)) => {
                let (k, v) = entry(x)?;
                strings.insert(k, text(v)?.into());
            }
            (5, Field::Varint(v)) => s["immutable"] = (v != 0).into(),
            _ => {}
        }
    }
    s["data"] = data.into();
    if !strings.is_empty() {
        s["stringData"] = strings.into();
    }
    Ok(s)
}

/// Decodes a protobuf request body (`k8s\0` + `runtime.Unknown`) into JSON.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let inner = body
        .strip_prefix(b"k8s\0")
        .ok_or("a protobuf body starts with the k8s\\0 magic")?;
    let (mut kind, mut raw) = (String::new(), &[][..]);
    for (n, f) in fields(inner)? {
        match (n, f) {
            (1, Field::Bytes(type_meta)) => {
                for (m, g) in fields(type_meta)? {
                    if let (2, Field::Bytes(k)) = (m, g) {
                        kind = text(k)?;
                    }
                }
            }
            (2, Field::Bytes(r)) => raw = r,
            _ => {}
        }
    }
    match kind.as_str() {
        "Secret" => secret(raw),
        other => Err(format!(
            "the test kit decodes protobuf only for Secrets, not {other:?}; send JSON"
        )),
    }
}
