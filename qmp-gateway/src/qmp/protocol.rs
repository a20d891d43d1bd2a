//! The QMP wire format: commands, responses, errors, events and the greeting.
//!
//! Messages are JSON objects (QEMU's `docs/interop/qmp-spec`):
//! - command: `{"execute": NAME, "arguments": {...}, "id": ANY}` — `arguments` and `id` are
//!   optional and members may come in any order;
//! - success: `{"return": VALUE, "id": ANY}`;
//! - error: `{"error": {"class": CLASS, "desc": TEXT}, "id": ANY}`;
//! - event: `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}`.
//!
//! The error texts follow QEMU's where a client might match on them.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The QEMU version the greeting claims. Clients such as the QEMU Python library and Kata
/// Containers refuse servers older than 5.0; the StratoVirt guide's greeting says 4.0.1.
pub const QEMU_COMPAT_VERSION: (u32, u32, u32) = (5, 0, 0);

/// The class of a QMP error, as QEMU names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Everything that has no more specific class.
    GenericError,
    /// The command does not exist, or may not be used now (capabilities negotiation).
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// The device named in the arguments does not exist.
    DeviceNotFound,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
    /// The client sent more commands than the flow control admits (StratoVirt's class).
    OperationThrottled,
}

impl ErrorClass {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
            ErrorClass::OperationThrottled => "OperationThrottled",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: what a command (or the protocol layer) answers instead of a return value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// Human-readable description, one line.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound` error with `desc`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }

    /// A `DeviceNotFound` error with `desc`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }

    /// QEMU's answer to a command nobody registered.
    pub fn unknown_command(name: &str) -> Self {
        Self::command_not_found(format!("The command {name} has not been found"))
    }
}

/// A parsed command.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The command name (`execute`).
    pub execute: String,
    /// The arguments; empty when none were given.
    pub arguments: Map<String, Value>,
    /// The client's `id`, echoed in the reply.
    pub id: Option<Value>,
}

/// A command that could not be parsed: the error to send, with the `id` if one was readable.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRequest {
    /// What was wrong.
    pub error: QmpError,
    /// The `id` member, when the input was an object that had one.
    pub id: Option<Value>,
}

/// Parses one complete JSON text as a QMP command.
pub fn parse_request(text: &[u8]) -> Result<Request, BadRequest> {
    let bad = |desc: String, id: Option<Value>| BadRequest {
        error: QmpError::generic(desc),
        id,
    };
    let value: Value =
        serde_json::from_slice(text).map_err(|e| bad(format!("JSON parse error, {e}"), None))?;
    let Value::Object(mut object) = value else {
        return Err(bad("QMP input must be a JSON object".into(), None));
    };
    let id = object.remove("id");
    let execute = match object.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => {
            return Err(bad(
                "QMP input member 'execute' must be a string".into(),
                id,
            ))
        }
        None => return Err(bad("QMP input lacks member 'execute'".into(), id)),
    };
    let arguments = match object.remove("arguments") {
        Some(Value::Object(args)) => args,
        Some(_) => {
            return Err(bad(
                "QMP input member 'arguments' must be an object".into(),
                id,
            ))
        }
        None => Map::new(),
    };
    if let Some(member) = object.keys().next() {
        return Err(bad(
            format!("QMP input member '{member}' is unexpected"),
            id,
        ));
    }
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

#[derive(Serialize)]
struct ReturnMsg<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    class: &'a str,
    desc: &'a str,
}

#[derive(Serialize)]
struct ErrorMsg<'a> {
    error: ErrorBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// Serializes a value we built ourselves; cannot fail for `serde_json::Value` trees and our
/// plain structs, but a failure still yields a valid QMP error line rather than a panic.
fn to_line<T: Serialize>(msg: &T) -> String {
    let mut line = serde_json::to_string(msg).unwrap_or_else(|e| {
        log::error!("cannot serialize a QMP message: {e}");
        r#"{"error":{"class":"GenericError","desc":"internal serialization error"}}"#.into()
    });
    line.push('\n');
    line
}

/// The success reply line (with trailing newline).
pub fn return_line(ret: &Value, id: Option<&Value>) -> String {
    to_line(&ReturnMsg { ret, id })
}

/// The error reply line (with trailing newline).
pub fn error_line(error: &QmpError, id: Option<&Value>) -> String {
    to_line(&ErrorMsg {
        error: ErrorBody {
            class: error.class.as_str(),
            desc: &error.desc,
        },
        id,
    })
}

/// The reply line for a command's outcome.
pub fn reply_line(result: &Result<Value, QmpError>, id: Option<&Value>) -> String {
    match result {
        Ok(ret) => return_line(ret, id),
        Err(e) => error_line(e, id),
    }
}

/// When an event happened, as QMP reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        }
    }
}

/// An asynchronous event. Deserializable too, so events the core sends up the control socket
/// can be passed on with their original timestamps ([`crate::qmp::EventBus::send`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event name, e.g. `STOP`, `DEVICE_DELETED`.
    pub event: String,
    /// Event data; `{}` when the event carries none.
    #[serde(default = "empty_object")]
    pub data: Value,
    /// When it happened.
    pub timestamp: Timestamp,
}

fn empty_object() -> Value {
    json!({})
}

impl Event {
    /// An event that happens now.
    pub fn new(name: impl Into<String>, data: Value) -> Self {
        Event {
            event: name.into(),
            data,
            timestamp: Timestamp::now(),
        }
    }

    /// The event line (with trailing newline).
    pub fn to_line(&self) -> String {
        to_line(self)
    }
}

/// The greeting sent when a client connects. `package` is e.g. `flotilla-0.1.0`.
pub fn greeting_line(package: &str) -> String {
    let (major, minor, micro) = QEMU_COMPAT_VERSION;
    to_line(&json!({
        "QMP": {
            "version": {
                "qemu": {"micro": micro, "minor": minor, "major": major},
                "package": package,
            },
            "capabilities": [],
        }
    }))
}

/// The greeting's package string for this build.
pub fn package_name() -> String {
    format!("flotilla-{}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Request, BadRequest> {
        parse_request(text.as_bytes())
    }

    #[test]
    fn commands_in_any_member_order() {
        let a = parse(r#"{"execute":"x","arguments":{"a":1},"id":7}"#).unwrap();
        let b = parse(r#"{"id":7,"arguments":{"a":1},"execute":"x"}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.execute, "x");
        assert_eq!(a.arguments["a"], 1);
        assert_eq!(a.id, Some(json!(7)));
        let c = parse(r#"{"execute":"stop"}"#).unwrap();
        assert!(c.arguments.is_empty());
        assert_eq!(c.id, None);
    }

    #[test]
    fn any_json_value_is_an_id() {
        for id in [r#""s""#, "1.5", "null", "[1,2]", r#"{"k":[true]}"#] {
            let r = parse(&format!(r#"{{"execute":"x","id":{id}}}"#)).unwrap();
            assert_eq!(r.id, Some(serde_json::from_str(id).unwrap()));
        }
    }

    #[test]
    fn malformed_commands() {
        let cases = [
            ("{", "JSON parse error"),
            ("[1]", "must be a JSON object"),
            ("\"execute\"", "must be a JSON object"),
            (r#"{"arguments":{}}"#, "lacks member 'execute'"),
            (r#"{"execute":1}"#, "'execute' must be a string"),
            (
                r#"{"execute":"x","arguments":[]}"#,
                "'arguments' must be an object",
            ),
            (
                r#"{"execute":"x","extra":1}"#,
                "member 'extra' is unexpected",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.error.class, ErrorClass::GenericError, "{text}");
            assert!(e.error.desc.contains(want), "{text}: {}", e.error.desc);
        }
        // The id of a bad command is still echoed when it can be read.
        let e = parse(r#"{"execute":1,"id":"abc"}"#).unwrap_err();
        assert_eq!(e.id, Some(json!("abc")));
    }

    #[test]
    fn reply_shapes() {
        assert_eq!(return_line(&json!({}), None), "{\"return\":{}}\n");
        assert_eq!(
            return_line(&json!([1]), Some(&json!("a"))),
            "{\"return\":[1],\"id\":\"a\"}\n"
        );
        let line = error_line(&QmpError::unknown_command("foo"), Some(&json!(3)));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"error":{"class":"CommandNotFound","desc":"The command foo has not been found"},"id":3})
        );
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
    }

    #[test]
    fn event_and_greeting_shapes() {
        let ev = Event::new("STOP", json!({}));
        let v: Value = serde_json::from_str(&ev.to_line()).unwrap();
        assert_eq!(v["event"], "STOP");
        assert_eq!(v["data"], json!({}));
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        let back: Event = serde_json::from_str(&ev.to_line()).unwrap();
        assert_eq!(back, ev);
        let bare: Event = serde_json::from_str(
            r#"{"event":"RESUME","timestamp":{"seconds":1,"microseconds":2}}"#,
        )
        .unwrap();
        assert_eq!(bare.data, json!({}));
        let g: Value = serde_json::from_str(&greeting_line(&package_name())).unwrap();
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], 5);
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        assert!(g["QMP"]["version"]["package"]
            .as_str()
            .unwrap()
            .starts_with("flotilla-"));
    }
}
