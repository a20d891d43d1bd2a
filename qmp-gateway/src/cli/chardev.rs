//! Character devices and what uses them: `-chardev`, `-mon`, `-qmp` and `-serial`.

use std::path::PathBuf;

use vmm::options::KeyValues;

use super::CliError;
use crate::qmp::ListenAddr;

/// A `-chardev` backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChardevBackend {
    /// `stdio`: our standard input and output.
    Stdio,
    /// `pty`: a pseudo-terminal.
    Pty,
    /// `file,path=P`: output appended to a file.
    File(PathBuf),
    /// `socket,(path=P|host=H,port=N),server,nowait`: a listening socket.
    Socket(ListenAddr),
}

/// A `-chardev BACKEND,id=ID[,...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevConfig {
    /// Its id.
    pub id: String,
    /// What it connects to.
    pub backend: ChardevBackend,
}

/// A `-mon chardev=ID[,id=MID],mode=control`: QMP served on a socket chardev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorConfig {
    /// The monitor's own id, if given.
    pub id: Option<String>,
    /// The chardev it serves on.
    pub chardev: String,
}

/// What `-serial` names, before chardev ids are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialArg {
    /// `stdio`.
    Stdio,
    /// `file:PATH`.
    File(PathBuf),
    /// `chardev:ID`.
    Chardev(String),
}

/// Turns the bare flags StratoVirt and QEMU write without a value (`server`, `nowait`) into
/// `key=value` items (`server=on`, `wait=off`) so the generic parser can read them. The
/// first `keep_first` items are left alone (the backend name of `-chardev`).
fn normalize_flags(text: &str, keep_first: usize) -> String {
    text.split(',')
        .enumerate()
        .map(|(i, item)| match item {
            "server" if i >= keep_first => "server=on",
            "nowait" if i >= keep_first => "wait=off",
            "wait" if i >= keep_first => "wait=on",
            _ => item,
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Requires `server` and `nowait`: StratoVirt serves sockets and never waits for a client.
fn require_server_nowait(kv: &KeyValues, option: &str) -> Result<(), CliError> {
    if kv.get_bool("server")? != Some(true) {
        return Err(CliError::NotImplemented {
            what: format!("-{option}: a client-mode socket (add 'server')"),
            issue: None,
        });
    }
    if kv.get_bool("wait")? != Some(false) {
        return Err(CliError::NotImplemented {
            what: format!("-{option}: waiting for a client at start-up (add 'nowait')"),
            issue: None,
        });
    }
    Ok(())
}

fn required<'a>(kv: &'a KeyValues, option: &str, key: &str) -> Result<&'a str, CliError> {
    match kv.get(key) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(CliError::invalid(option, format!("'{key}' is required"))),
    }
}

/// Parses `host:port` (`[v6]:port` too) for a TCP listener.
pub fn parse_host_port(option: &str, host: &str, port: &str) -> Result<ListenAddr, CliError> {
    if host.is_empty() {
        return Err(CliError::invalid(option, "the TCP host is empty"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| CliError::invalid(option, format!("invalid TCP port '{port}'")))?;
    Ok(ListenAddr::Tcp(format!("{host}:{port}")))
}

/// `-qmp unix:PATH,server,nowait` or `-qmp tcp:HOST:PORT,server,nowait`.
pub fn parse_qmp(text: &str) -> Result<ListenAddr, CliError> {
    let (addr, flags) = text.split_once(',').unwrap_or((text, ""));
    let addr = if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(CliError::invalid("qmp", "the unix socket path is empty"));
        }
        ListenAddr::Unix(PathBuf::from(path))
    } else if let Some(hp) = addr.strip_prefix("tcp:") {
        let (host, port) = hp
            .rsplit_once(':')
            .ok_or_else(|| CliError::invalid("qmp", "expected tcp:HOST:PORT"))?;
        parse_host_port("qmp", host, port)?
    } else {
        return Err(CliError::invalid(
            "qmp",
            format!("'{addr}': expected unix:PATH or tcp:HOST:PORT"),
        ));
    };
    if flags.is_empty() {
        return Err(CliError::invalid(
            "qmp",
            "'server' and 'nowait' are required",
        ));
    }
    let kv = KeyValues::parse("qmp", &normalize_flags(flags, 0), None)?;
    kv.check_keys(&["server", "wait"])?;
    require_server_nowait(&kv, "qmp")?;
    Ok(addr)
}

/// `-chardev BACKEND,id=ID[,path=P][,host=H,port=N][,server][,nowait]`.
pub fn parse_chardev(text: &str) -> Result<ChardevConfig, CliError> {
    let kv = KeyValues::parse("chardev", &normalize_flags(text, 1), Some("backend"))?;
    let backend_name = kv.get("backend").unwrap_or_default();
    let backend = match backend_name {
        "stdio" => {
            kv.check_keys(&["backend", "id"])?;
            ChardevBackend::Stdio
        }
        "pty" => {
            kv.check_keys(&["backend", "id"])?;
            ChardevBackend::Pty
        }
        "file" => {
            kv.check_keys(&["backend", "id", "path"])?;
            ChardevBackend::File(PathBuf::from(required(&kv, "chardev", "path")?))
        }
        "socket" => {
            kv.check_keys(&["backend", "id", "path", "host", "port", "server", "wait"])?;
            let addr = match (kv.get("path"), kv.get("host"), kv.get("port")) {
                (Some(path), None, None) if !path.is_empty() => {
                    ListenAddr::Unix(PathBuf::from(path))
                }
                (None, Some(host), Some(port)) => parse_host_port("chardev", host, port)?,
                _ => {
                    return Err(CliError::invalid(
                        "chardev",
                        "a socket needs either path=PATH or host=HOST,port=PORT",
                    ))
                }
            };
            require_server_nowait(&kv, "chardev")?;
            ChardevBackend::Socket(addr)
        }
        other => {
            return Err(CliError::invalid(
                "chardev",
                format!("unknown backend '{other}' (expected stdio, pty, socket or file)"),
            ))
        }
    };
    Ok(ChardevConfig {
        id: required(&kv, "chardev", "id")?.to_string(),
        backend,
    })
}

/// `-mon chardev=ID[,id=MID][,mode=control]`.
pub fn parse_mon(text: &str) -> Result<MonitorConfig, CliError> {
    let kv = KeyValues::parse("mon", text, None)?;
    kv.check_keys(&["chardev", "id", "mode"])?;
    match kv.get("mode") {
        Some("control") => {}
        Some(other) => {
            return Err(CliError::invalid(
                "mon",
                format!("mode '{other}': only mode=control is supported"),
            ))
        }
        None => return Err(CliError::invalid("mon", "mode=control is required")),
    }
    Ok(MonitorConfig {
        id: kv.get("id").map(str::to_string),
        chardev: required(&kv, "mon", "chardev")?.to_string(),
    })
}

/// `-serial stdio|chardev:ID|file:PATH`.
pub fn parse_serial(text: &str) -> Result<SerialArg, CliError> {
    if text == "stdio" {
        return Ok(SerialArg::Stdio);
    }
    if let Some(id) = text.strip_prefix("chardev:").filter(|s| !s.is_empty()) {
        return Ok(SerialArg::Chardev(id.to_string()));
    }
    if let Some(path) = text.strip_prefix("file:").filter(|s| !s.is_empty()) {
        return Ok(SerialArg::File(PathBuf::from(path)));
    }
    Err(CliError::invalid(
        "serial",
        format!("'{text}': expected stdio, chardev:ID or file:PATH"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_addresses() {
        assert_eq!(
            parse_qmp("unix:/tmp/q.sock,server,nowait").unwrap(),
            ListenAddr::Unix("/tmp/q.sock".into())
        );
        assert_eq!(
            parse_qmp("tcp:127.0.0.1:4444,server,nowait").unwrap(),
            ListenAddr::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            parse_qmp("tcp:[::1]:4444,server=on,wait=off").unwrap(),
            ListenAddr::Tcp("[::1]:4444".into())
        );
        let bad = [
            ("unix:/tmp/q.sock", "'server' and 'nowait' are required"),
            ("unix:/tmp/q.sock,server", "nowait"),
            ("unix:/tmp/q.sock,nowait", "client-mode"),
            ("unix:/tmp/q.sock,server,wait", "nowait"),
            ("unix:,server,nowait", "path is empty"),
            ("tcp:127.0.0.1,server,nowait", "expected tcp:HOST:PORT"),
            ("tcp::4444,server,nowait", "host is empty"),
            ("tcp:h:99999,server,nowait", "invalid TCP port"),
            ("udp:1,server,nowait", "expected unix:PATH"),
            ("unix:/q,server,nowait,extra", "malformed item"),
            ("unix:/q,server,nowait,x=1", "unknown parameter 'x'"),
        ];
        for (text, want) in bad {
            let e = parse_qmp(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("-qmp"), "{text}: {e}");
        }
    }

    #[test]
    fn chardevs() {
        assert_eq!(
            parse_chardev("socket,path=/tmp/m.sock,id=mon0,server,nowait").unwrap(),
            ChardevConfig {
                id: "mon0".into(),
                backend: ChardevBackend::Socket(ListenAddr::Unix("/tmp/m.sock".into()))
            }
        );
        assert_eq!(
            parse_chardev("socket,host=127.0.0.1,port=5555,id=m,server,nowait")
                .unwrap()
                .backend,
            ChardevBackend::Socket(ListenAddr::Tcp("127.0.0.1:5555".into()))
        );
        assert_eq!(
            parse_chardev("stdio,id=s").unwrap().backend,
            ChardevBackend::Stdio
        );
        assert_eq!(
            parse_chardev("pty,id=p").unwrap().backend,
            ChardevBackend::Pty
        );
        assert_eq!(
            parse_chardev("file,id=f,path=/tmp/out").unwrap().backend,
            ChardevBackend::File("/tmp/out".into())
        );
        let bad = [
            ("socket,path=/s,id=m", "client-mode"),
            ("socket,path=/s,id=m,server", "nowait"),
            ("socket,id=m,server,nowait", "path=PATH or host=HOST"),
            ("socket,path=/s,host=h,port=1,id=m,server,nowait", "either"),
            ("socket,path=/s,server,nowait", "'id' is required"),
            ("file,id=f", "'path' is required"),
            ("stdio,id=s,path=/x", "unknown parameter 'path'"),
            ("spice,id=x", "unknown backend 'spice'"),
            ("stdio,id=s,server", "unknown parameter 'server'"),
        ];
        for (text, want) in bad {
            let e = parse_chardev(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn monitors_and_serial() {
        assert_eq!(
            parse_mon("chardev=c,id=m,mode=control").unwrap(),
            MonitorConfig {
                id: Some("m".into()),
                chardev: "c".into()
            }
        );
        for (text, want) in [
            ("chardev=c,mode=readline", "only mode=control"),
            ("chardev=c", "mode=control is required"),
            ("id=m,mode=control", "'chardev' is required"),
            (
                "chardev=c,mode=control,pretty=on",
                "unknown parameter 'pretty'",
            ),
        ] {
            let e = parse_mon(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert_eq!(parse_serial("stdio").unwrap(), SerialArg::Stdio);
        assert_eq!(
            parse_serial("chardev:c0").unwrap(),
            SerialArg::Chardev("c0".into())
        );
        assert_eq!(
            parse_serial("file:/tmp/s").unwrap(),
            SerialArg::File("/tmp/s".into())
        );
        for bad in ["pty", "chardev:", "file:", "tcp:1:2"] {
            assert!(parse_serial(bad).is_err(), "{bad}");
        }
    }
}
