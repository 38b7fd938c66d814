//! The shapes of QMP messages: greeting, replies, events.
//!
//! Everything is read as untyped JSON first and classified by its keys, so an
//! unknown event, an extra field or a new enum value from a newer QEMU never
//! breaks the connection. Typed decoding happens later, per call.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::codec::preview;
use crate::error::{Error, Result};

/// QEMU's version as announced in the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The greeting QEMU sends when a client connects.
#[derive(Debug, Clone)]
pub struct Greeting {
    pub version: Version,
    /// The `package` string, e.g. `Debian 1:10.0.2+ds-2`.
    pub package: String,
    /// Capabilities offered, e.g. `["oob"]`.
    pub capabilities: Vec<String>,
    /// Whether out-of-band execution was offered and enabled.
    pub oob_enabled: bool,
}

impl Greeting {
    /// Parses the first line a QMP server sends. `None` when it is not a greeting.
    pub(crate) fn parse(value: &Value) -> Option<Greeting> {
        let qmp = value.get("QMP")?;
        let v = qmp.get("version")?;
        let q = v.get("qemu")?;
        let num = |k: &str| {
            q.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
        };
        let version = Version {
            major: num("major")?,
            minor: num("minor")?,
            micro: num("micro")?,
        };
        let package = v
            .get("package")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim()
            .to_owned();
        let capabilities = qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|caps| {
                caps.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Some(Greeting {
            version,
            package,
            capabilities,
            oob_enabled: false,
        })
    }

    /// True when QEMU offered capability `name`.
    pub fn offers(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }
}

/// An asynchronous event from QEMU, e.g. `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event name.
    pub name: String,
    /// The event's `data` member (`{}` when absent).
    pub data: Value,
    /// QEMU's timestamp in microseconds since the epoch, when present.
    pub timestamp_us: Option<u64>,
}

impl Event {
    /// Decodes this event as the typed `qapi` event `E`; `None` when the name
    /// differs, an error when the name matches but the data does not decode
    /// (e.g. an enum value this build does not know).
    pub fn parse<E: qapi::Event>(&self) -> Option<serde_json::Result<E>> {
        (self.name == E::NAME).then(|| serde_json::from_value(self.data.clone()))
    }

    /// A string member of `data`, e.g. `event.str("id")`.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

/// QEMU's error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QmpError {
    pub class: String,
    pub desc: String,
}

/// One message from the server after the greeting.
#[derive(Debug)]
pub(crate) enum Incoming {
    Reply {
        id: Option<Value>,
        result: std::result::Result<Value, QmpError>,
    },
    Event(Event),
    /// A message of no known shape: ignored (logged), never fatal.
    Unknown(Value),
}

impl Incoming {
    pub(crate) fn classify(value: Value) -> Result<Incoming> {
        let Value::Object(mut map) = value else {
            return Err(Error::Protocol(format!(
                "expected a JSON object, got {}",
                preview(value.to_string().as_bytes())
            )));
        };
        let id = map.remove("id");
        if let Some(ret) = map.remove("return") {
            return Ok(Incoming::Reply {
                id,
                result: Ok(ret),
            });
        }
        if let Some(err) = map.remove("error") {
            let field = |k: &str| err.get(k).and_then(Value::as_str).map(str::to_owned);
            return Ok(Incoming::Reply {
                id,
                result: Err(QmpError {
                    class: field("class").unwrap_or_else(|| "GenericError".into()),
                    desc: field("desc").unwrap_or_else(|| err.to_string()),
                }),
            });
        }
        if let Some(Value::String(name)) = map.remove("event") {
            let timestamp_us = map.get("timestamp").and_then(|t| {
                let s = t.get("seconds")?.as_u64()?;
                let us = t.get("microseconds")?.as_u64()?;
                Some(s.saturating_mul(1_000_000).saturating_add(us))
            });
            let data = map
                .remove("data")
                .unwrap_or_else(|| Value::Object(Map::new()));
            return Ok(Incoming::Event(Event {
                name,
                data,
                timestamp_us,
            }));
        }
        if let Some(id) = id {
            map.insert("id".into(), id);
        }
        Ok(Incoming::Unknown(Value::Object(map)))
    }
}

/// Decodes a reply into the caller's type, naming the command on failure.
pub(crate) fn decode_reply<T: DeserializeOwned>(command: &str, value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|source| Error::Decode {
        command: command.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_replies_events_and_unknowns() {
        let r = Incoming::classify(json!({"return": {}, "id": 3})).unwrap();
        assert!(matches!(r, Incoming::Reply { id: Some(ref i), result: Ok(_) } if i == &json!(3)));
        let e = Incoming::classify(
            json!({"error": {"class": "SomeFutureClass", "desc": "no"}, "id": 4}),
        )
        .unwrap();
        match e {
            Incoming::Reply { result: Err(e), .. } => {
                assert_eq!(e.class, "SomeFutureClass");
                assert_eq!(e.desc, "no");
            }
            other => panic!("{other:?}"),
        }
        let ev = Incoming::classify(json!({"event": "NEW_THING_FROM_QEMU_12",
            "data": {"x": 1}, "timestamp": {"seconds": 2, "microseconds": 5}}))
        .unwrap();
        match ev {
            Incoming::Event(ev) => {
                assert_eq!(ev.name, "NEW_THING_FROM_QEMU_12");
                assert_eq!(ev.timestamp_us, Some(2_000_005));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Incoming::classify(json!({"hello": 1})).unwrap(),
            Incoming::Unknown(_)
        ));
        assert!(Incoming::classify(json!([1, 2])).is_err());
    }

    #[test]
    fn greeting_with_unknown_fields_and_capabilities() {
        let g = Greeting::parse(&json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2+ds-2 "}, "capabilities": ["oob", "future-cap"], "extra": true}}))
        .unwrap();
        assert_eq!(g.version.to_string(), "10.0.2");
        assert!(g.offers("oob") && g.offers("future-cap"));
        assert_eq!(g.package, "Debian 1:10.0.2+ds-2");
        assert!(Greeting::parse(&json!({"return": {}})).is_none());
    }
}
