//! One client's protocol state: capabilities negotiation, flow control, the built-in
//! commands, argument checks, and dispatch to the [`CommandHandler`].
//!
//! Socket-free, so every protocol rule is testable with plain byte strings.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::handler::{ClientCtx, CommandHandler};
use super::protocol::{
    error_line, parse_request, reply_line, ErrorClass, QmpError, QEMU_COMPAT_VERSION,
};
use super::ratelimit::LeakyBucket;
use super::schema::{self, CommandSpec, BUILTIN_COMMANDS};

/// The commands a server offers: the built-ins plus what the handler registers.
pub struct Registry {
    handler: Arc<dyn CommandHandler>,
    commands: Vec<CommandSpec>,
    package: String,
}

impl Registry {
    /// Collects the handler's commands. A handler entry that shadows a built-in is dropped.
    pub fn new(handler: Arc<dyn CommandHandler>, package: String) -> Self {
        let mut commands = BUILTIN_COMMANDS.to_vec();
        for spec in handler.commands() {
            if schema::find(&commands, spec.name).is_some() {
                log::warn!(
                    "QMP handler registers '{}' twice or over a built-in; ignored",
                    spec.name
                );
                continue;
            }
            commands.push(spec);
        }
        Registry {
            handler,
            commands,
            package,
        }
    }

    /// Every command name, in registration order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.commands.iter().map(|c| c.name)
    }

    /// The package string of the greeting and `query-version`.
    pub fn package(&self) -> &str {
        &self.package
    }

    /// The handler.
    pub fn handler(&self) -> &Arc<dyn CommandHandler> {
        &self.handler
    }
}

/// A client's protocol state.
pub struct Session {
    registry: Arc<Registry>,
    ctx: ClientCtx,
    negotiated: bool,
    bucket: Option<LeakyBucket>,
}

impl Session {
    /// A fresh session in capabilities-negotiation mode; `rate_limit` in commands/second.
    pub fn new(registry: Arc<Registry>, ctx: ClientCtx, rate_limit: Option<u32>) -> Self {
        Session {
            registry,
            ctx,
            negotiated: false,
            bucket: rate_limit.map(LeakyBucket::new),
        }
    }

    /// Whether `qmp_capabilities` succeeded (the client then receives events).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// The client this session serves.
    pub fn client(&self) -> &ClientCtx {
        &self.ctx
    }

    /// Handles one framed message and returns the reply line.
    pub fn handle(&mut self, text: &[u8]) -> String {
        let parsed = parse_request(text);
        if let Some(bucket) = &mut self.bucket {
            if !bucket.admit() {
                let id = match &parsed {
                    Ok(r) => r.id.as_ref(),
                    Err(bad) => bad.id.as_ref(),
                };
                let error = QmpError {
                    class: ErrorClass::OperationThrottled,
                    desc: format!(
                        "More than {} requests received during 1 second",
                        bucket.rate()
                    ),
                };
                return error_line(&error, id);
            }
        }
        match parsed {
            Err(bad) => error_line(&bad.error, bad.id.as_ref()),
            Ok(request) => {
                let result = self.dispatch(&request.execute, request.arguments);
                if let Err(e) = &result {
                    log::debug!(
                        "QMP client {}: {} failed: {}",
                        self.ctx.id(),
                        request.execute,
                        e
                    );
                }
                reply_line(&result, request.id.as_ref())
            }
        }
    }

    fn dispatch(&mut self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        if name == "qmp_capabilities" {
            return self.negotiate(&args);
        }
        if !self.negotiated {
            return Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        let spec = schema::find(&self.registry.commands, name)
            .ok_or_else(|| QmpError::unknown_command(name))?;
        spec.check(&args)?;
        match name {
            "query-version" => {
                let (major, minor, micro) = QEMU_COMPAT_VERSION;
                Ok(json!({
                    "qemu": {"major": major, "minor": minor, "micro": micro},
                    "package": self.registry.package,
                }))
            }
            "query-commands" => Ok(Value::Array(
                self.registry
                    .names()
                    .map(|n| json!({ "name": n }))
                    .collect(),
            )),
            _ => {
                let handler = &self.registry.handler;
                let ctx = self.ctx.clone();
                catch_unwind(AssertUnwindSafe(|| handler.execute(name, args, ctx))).unwrap_or_else(
                    |_| {
                        log::error!("QMP handler panicked in '{name}'");
                        Err(QmpError::generic(format!("internal error in {name}")))
                    },
                )
            }
        }
    }

    fn negotiate(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if self.negotiated {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        if let Some(spec) = schema::find(BUILTIN_COMMANDS, "qmp_capabilities") {
            spec.check(args)?;
        }
        if let Some(Value::Array(caps)) = args.get("enable") {
            if let Some(cap) = caps.first() {
                return Err(QmpError::generic(match cap.as_str() {
                    Some(name) => format!("Capability '{name}' not available"),
                    None => "Invalid parameter type for 'enable', expected: string".into(),
                }));
            }
        }
        self.negotiated = true;
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::handler::Peer;
    use crate::qmp::schema::{req, ArgType};

    struct Fake;

    const ECHO_ARGS: &[crate::qmp::ArgSpec] = &[req("v", ArgType::Any)];

    impl CommandHandler for Fake {
        fn commands(&self) -> Vec<CommandSpec> {
            vec![
                CommandSpec::with("echo", ECHO_ARGS),
                CommandSpec::bare("boom"),
                CommandSpec::bare("fail"),
                CommandSpec::bare("query-version"),
            ]
        }
        fn execute(
            &self,
            name: &str,
            args: Map<String, Value>,
            _client: ClientCtx,
        ) -> Result<Value, QmpError> {
            match name {
                "echo" => Ok(args["v"].clone()),
                "fail" => Err(QmpError::device_not_found("no such device")),
                _ => panic!("boom"),
            }
        }
    }

    fn session(rate: Option<u32>) -> Session {
        let registry = Arc::new(Registry::new(Arc::new(Fake), "flotilla-test".into()));
        Session::new(registry, ClientCtx::new(1, Peer::Unix), rate)
    }

    fn call(s: &mut Session, text: &str) -> Value {
        let line = s.handle(text.as_bytes());
        assert!(line.ends_with('\n'));
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn negotiation_mode() {
        let mut s = session(None);
        let r = call(&mut s, r#"{"execute":"query-version","id":1}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], 1);
        let r = call(&mut s, r#"{"execute":"nonsense"}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert!(!s.negotiated());
        let r = call(
            &mut s,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#,
        );
        assert_eq!(r["error"]["desc"], "Capability 'oob' not available");
        let r = call(
            &mut s,
            r#"{"execute":"qmp_capabilities","arguments":{"x":1}}"#,
        );
        assert_eq!(r["error"]["class"], "GenericError");
        assert!(!s.negotiated());
        let r = call(&mut s, r#"{"execute":"qmp_capabilities","arguments":{}}"#);
        assert_eq!(r, json!({"return":{}}));
        assert!(s.negotiated());
        let r = call(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert!(s.negotiated());
    }

    #[test]
    fn builtins_and_dispatch() {
        let mut s = session(None);
        call(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        let r = call(&mut s, r#"{"id":"v","execute":"query-version"}"#);
        assert_eq!(r["return"]["qemu"]["major"], 5);
        assert_eq!(r["return"]["package"], "flotilla-test");
        assert_eq!(r["id"], "v");
        let r = call(&mut s, r#"{"execute":"query-commands"}"#);
        let names: Vec<_> = r["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "qmp_capabilities",
                "query-version",
                "query-commands",
                "echo",
                "boom",
                "fail"
            ]
        );
        let r = call(
            &mut s,
            r#"{"arguments":{"v":[1,"x"]},"execute":"echo","id":[9]}"#,
        );
        assert_eq!(r, json!({"return":[1,"x"],"id":[9]}));
        let r = call(&mut s, r#"{"execute":"echo"}"#);
        assert_eq!(r["error"]["desc"], "Parameter 'v' is missing");
        let r = call(&mut s, r#"{"execute":"echo","arguments":{"v":1,"w":2}}"#);
        assert_eq!(r["error"]["desc"], "Parameter 'w' is unexpected");
        let r = call(&mut s, r#"{"execute":"fail"}"#);
        assert_eq!(r["error"]["class"], "DeviceNotFound");
        let r = call(&mut s, r#"{"execute":"boom","id":2}"#);
        assert_eq!(r["error"]["desc"], "internal error in boom");
        assert_eq!(r["id"], 2);
        let r = call(&mut s, r#"{"execute":"nope"}"#);
        assert_eq!(r["error"]["desc"], "The command nope has not been found");
        let r = call(&mut s, "not json");
        assert_eq!(r["error"]["class"], "GenericError");
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error"));
    }

    #[test]
    fn rate_limit_answers_with_an_error() {
        let mut s = session(Some(5));
        call(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        let replies: Vec<Value> = (0..10)
            .map(|i| {
                call(
                    &mut s,
                    &format!(r#"{{"execute":"echo","arguments":{{"v":{i}}},"id":{i}}}"#),
                )
            })
            .collect();
        let ok = replies.iter().filter(|r| r.get("return").is_some()).count();
        assert_eq!(
            ok, 4,
            "5 per second including qmp_capabilities: {replies:?}"
        );
        let throttled = &replies[9];
        assert_eq!(throttled["error"]["class"], "OperationThrottled");
        assert_eq!(throttled["id"], 9);
    }
}
