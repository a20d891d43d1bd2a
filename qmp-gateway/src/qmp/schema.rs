//! Command schemas: which commands exist and which arguments each takes.
//!
//! The server checks every command's arguments against its [`CommandSpec`] before a handler
//! sees them, so handlers (and the core, for forwarded commands) receive only well-typed
//! arguments and a client learns about a typo instead of having it ignored. Nested objects
//! (`blockdev-add`'s `file`, `chardev-add`'s `backend`) are checked by the command's handler.
//!
//! [`STRATOVIRT_COMMANDS`] is StratoVirt's command set with StratoVirt's argument names
//! (`machine_manager/src/qmp/qmp_schema.rs` upstream, and the QMP reference in
//! `reference/stratovirt-qmp.md`). [`VENDOR_COMMANDS`] are flotilla's own (docs/qmp.md).

use serde_json::{Map, Value};

use super::protocol::QmpError;

/// The JSON type an argument must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    /// A JSON string.
    Str,
    /// A JSON number without fraction (signed or unsigned 64-bit).
    Int,
    /// Any JSON number.
    Number,
    /// `true` or `false`.
    Bool,
    /// A JSON object (contents checked by the handler).
    Object,
    /// A JSON array (contents checked by the handler).
    Array,
    /// Anything.
    Any,
}

impl ArgType {
    /// QEMU's name for the type in error messages.
    pub fn name(self) -> &'static str {
        match self {
            ArgType::Str => "string",
            ArgType::Int => "integer",
            ArgType::Number => "number",
            ArgType::Bool => "boolean",
            ArgType::Object => "object",
            ArgType::Array => "array",
            ArgType::Any => "any",
        }
    }

    /// Whether `value` has this type.
    pub fn accepts(self, value: &Value) -> bool {
        match self {
            ArgType::Str => value.is_string(),
            ArgType::Int => value.is_i64() || value.is_u64(),
            ArgType::Number => value.is_number(),
            ArgType::Bool => value.is_boolean(),
            ArgType::Object => value.is_object(),
            ArgType::Array => value.is_array(),
            ArgType::Any => true,
        }
    }
}

/// One argument of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    /// Argument name as on the wire.
    pub name: &'static str,
    /// Its JSON type.
    pub ty: ArgType,
    /// Whether it must be present.
    pub required: bool,
}

/// A required argument.
pub const fn req(name: &'static str, ty: ArgType) -> ArgSpec {
    ArgSpec {
        name,
        ty,
        required: true,
    }
}

/// An optional argument.
pub const fn opt(name: &'static str, ty: ArgType) -> ArgSpec {
    ArgSpec {
        name,
        ty,
        required: false,
    }
}

/// A command and its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    /// The command name (`execute`).
    pub name: &'static str,
    /// Every argument it accepts; anything else is rejected.
    pub args: &'static [ArgSpec],
}

impl CommandSpec {
    /// A command without arguments.
    pub const fn bare(name: &'static str) -> Self {
        CommandSpec { name, args: &[] }
    }

    /// A command with arguments.
    pub const fn with(name: &'static str, args: &'static [ArgSpec]) -> Self {
        CommandSpec { name, args }
    }

    /// Checks `args` against the spec: required ones present, nothing unknown, types right.
    /// The messages are QEMU's.
    pub fn check(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        for (name, value) in args {
            let spec =
                self.args.iter().find(|a| a.name == name).ok_or_else(|| {
                    QmpError::generic(format!("Parameter '{name}' is unexpected"))
                })?;
            if !spec.ty.accepts(value) {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: {}",
                    spec.ty.name()
                )));
            }
        }
        match self
            .args
            .iter()
            .find(|a| a.required && !args.contains_key(a.name))
        {
            Some(missing) => Err(QmpError::generic(format!(
                "Parameter '{}' is missing",
                missing.name
            ))),
            None => Ok(()),
        }
    }
}

use ArgType::{Array, Bool, Int, Object, Str};

/// The commands the server itself answers, whatever the handler.
pub const BUILTIN_COMMANDS: &[CommandSpec] = &[
    CommandSpec::with("qmp_capabilities", &[opt("enable", Array)]),
    CommandSpec::bare("query-version"),
    CommandSpec::bare("query-commands"),
];

/// StratoVirt's QMP commands (beyond [`BUILTIN_COMMANDS`]) with their arguments.
pub const STRATOVIRT_COMMANDS: &[CommandSpec] = &[
    // Lifecycle.
    CommandSpec::bare("quit"),
    CommandSpec::bare("stop"),
    CommandSpec::bare("cont"),
    CommandSpec::bare("system_powerdown"),
    CommandSpec::bare("system_reset"),
    CommandSpec::bare("query-status"),
    CommandSpec::bare("query-cpus"),
    CommandSpec::bare("query-hotpluggable-cpus"),
    // Hotplug.
    CommandSpec::with(
        "device_add",
        &[
            req("id", Str),
            req("driver", Str),
            opt("addr", Str),
            opt("lun", Int),
            opt("drive", Str),
            opt("romfile", Str),
            opt("share-rw", Str),
            opt("bus", Str),
            opt("mac", Str),
            opt("netdev", Str),
            opt("chardev", Str),
            opt("disable-modern", Str),
            opt("mq", Str),
            opt("vectors", Str),
            opt("serial", Str),
            opt("iothread", Str),
            opt("multifunction", Bool),
            opt("host", Str),
            opt("num-queues", Int),
            opt("boot_index", Int),
            opt("sysfsdev", Str),
            opt("queue-size", Int),
        ],
    ),
    CommandSpec::with("device_del", &[req("id", Str)]),
    // Block backends.
    CommandSpec::with(
        "blockdev-add",
        &[
            req("node-name", Str),
            req("file", Object),
            opt("media", Str),
            opt("cache", Object),
            opt("read-only", Bool),
            opt("driver", Str),
            opt("aio", Str),
            opt("detect-zeroes", Str),
            opt("discard", Str),
            opt("backing", Str),
            opt("id", Str),
            opt("options", Str),
            opt("throttling.iops-total", Int),
            opt("l2-cache-size", Str),
            opt("refcount-cache-size", Str),
        ],
    ),
    CommandSpec::with("blockdev-del", &[req("node-name", Str)]),
    CommandSpec::with(
        "blockdev-snapshot-internal-sync",
        &[req("device", Str), req("name", Str)],
    ),
    CommandSpec::with(
        "blockdev-snapshot-delete-internal-sync",
        &[req("device", Str), req("name", Str)],
    ),
    CommandSpec::bare("query-block"),
    // Net backends.
    CommandSpec::with(
        "netdev_add",
        &[
            req("id", Str),
            opt("ifname", Str),
            opt("fd", Str),
            opt("fds", Str),
            opt("dnssearch", Str),
            opt("type", Str),
            opt("vhost", Bool),
            opt("vhostfd", Str),
            opt("vhostfds", Str),
            opt("downscript", Str),
            opt("script", Str),
            opt("queues", Int),
            opt("chardev", Str),
        ],
    ),
    CommandSpec::with("netdev_del", &[req("id", Str)]),
    // Character and camera backends (standard VM only in StratoVirt).
    CommandSpec::with("chardev-add", &[req("id", Str), req("backend", Object)]),
    CommandSpec::with("chardev-remove", &[req("id", Str)]),
    CommandSpec::with(
        "cameradev_add",
        &[req("id", Str), opt("path", Str), req("driver", Str)],
    ),
    CommandSpec::with("cameradev_del", &[req("id", Str)]),
    // Balloon.
    CommandSpec::with("balloon", &[req("value", Int)]),
    CommandSpec::bare("query-balloon"),
    // Snapshot / migration.
    CommandSpec::with("migrate", &[req("uri", Str)]),
    CommandSpec::bare("query-migrate"),
    CommandSpec::bare("migrate_cancel"),
    // Debug.
    CommandSpec::with("query-vcpu-reg", &[req("addr", Str), req("vcpu", Int)]),
    CommandSpec::with("query-mem-gpa", &[req("gpa", Str)]),
    CommandSpec::bare("query-display-image"),
    CommandSpec::with("trace-get-state", &[req("name", Str)]),
    CommandSpec::with("trace-set-state", &[req("name", Str), req("enable", Bool)]),
    // Others.
    CommandSpec::with("getfd", &[req("fdname", Str)]),
    CommandSpec::with("switch-audio-record", &[req("authorized", Str)]),
    CommandSpec::with("human-monitor-command", &[req("command-line", Str)]),
];

/// flotilla's own commands, named with the `flotilla-` prefix (`x-flotilla-` for unstable
/// diagnostics, as QEMU's `x-`) so that no StratoVirt or QEMU name is shadowed.
pub const VENDOR_COMMANDS: &[CommandSpec] = &[
    CommandSpec::bare("flotilla-query-backends"),
    // A device's virtqueues read from guest memory: which side of a stalled device stopped.
    CommandSpec::with("x-flotilla-query-virtqueues", &[req("id", Str)]),
];

/// Looks up `name` in `specs`.
pub fn find<'a>(specs: &'a [CommandSpec], name: &str) -> Option<&'a CommandSpec> {
    specs.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test arguments are objects"),
        }
    }

    #[test]
    fn argument_checks() {
        let balloon = find(STRATOVIRT_COMMANDS, "balloon").unwrap();
        assert!(balloon.check(&args(json!({"value": 1u64 << 40}))).is_ok());
        let e = balloon.check(&args(json!({"value": "2G"}))).unwrap_err();
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'value', expected: integer"
        );
        assert!(balloon.check(&args(json!({"value": 1.5}))).is_err());
        let e = balloon.check(&args(json!({}))).unwrap_err();
        assert_eq!(e.desc, "Parameter 'value' is missing");
        let e = balloon
            .check(&args(json!({"value": 1, "extra": true})))
            .unwrap_err();
        assert_eq!(e.desc, "Parameter 'extra' is unexpected");
        let virtqueues = find(VENDOR_COMMANDS, "x-flotilla-query-virtqueues").unwrap();
        assert!(virtqueues.check(&args(json!({"id": "disk0"}))).is_ok());
        let e = virtqueues.check(&Map::new()).unwrap_err();
        assert_eq!(e.desc, "Parameter 'id' is missing");
        let stop = find(STRATOVIRT_COMMANDS, "stop").unwrap();
        assert!(stop.check(&Map::new()).is_ok());
        assert!(stop.check(&args(json!({"x": 1}))).is_err());
    }

    #[test]
    fn every_type() {
        let cases = [
            (ArgType::Str, json!("s"), json!(1)),
            (ArgType::Int, json!(-3), json!(0.5)),
            (ArgType::Number, json!(0.5), json!("1")),
            (ArgType::Bool, json!(false), json!("false")),
            (ArgType::Object, json!({}), json!([])),
            (ArgType::Array, json!([]), json!({})),
        ];
        for (ty, good, bad) in cases {
            assert!(ty.accepts(&good), "{ty:?}");
            assert!(!ty.accepts(&bad), "{ty:?}");
        }
        assert!(ArgType::Any.accepts(&Value::Null));
    }

    #[test]
    fn the_tables_have_no_duplicates() {
        let mut names: Vec<_> = BUILTIN_COMMANDS
            .iter()
            .chain(STRATOVIRT_COMMANDS)
            .chain(VENDOR_COMMANDS)
            .map(|c| c.name)
            .collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
    }
}
