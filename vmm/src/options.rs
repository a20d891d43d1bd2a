//! StratoVirt-style command-line parsing.
//!
//! StratoVirt (like QEMU) uses single-dash long options (`-kernel PATH`, `-smp 2`) whose values
//! are often comma-separated `key=value` lists (`-machine type=microvm,mem-share=on`). Neither
//! clap nor getopt model that grammar (optional values such as `-D [logfile]`, repeatable
//! options, an implicit first key), so this small parser does. It knows nothing about what the
//! options mean: `flotilla-vmm` and the `flotilla` gateway each pass their own table of
//! [`OptionSpec`]s and interpret the result.

use std::collections::HashMap;

/// Whether an option takes a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    /// `-daemonize`: never takes a value.
    Flag,
    /// `-kernel PATH`: always takes a value.
    Value,
    /// `-D [logfile]`: takes the next word as value unless it looks like an option.
    OptionalValue,
}

/// One option a program accepts.
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    /// Name without the leading dash(es).
    pub name: &'static str,
    /// Whether it takes a value.
    pub arity: Arity,
    /// Whether it may be given more than once (`-device`, `-drive`).
    pub repeatable: bool,
}

impl OptionSpec {
    /// An option that takes a value once.
    pub const fn value(name: &'static str) -> Self {
        OptionSpec {
            name,
            arity: Arity::Value,
            repeatable: false,
        }
    }
    /// An option that takes a value and may repeat.
    pub const fn repeated(name: &'static str) -> Self {
        OptionSpec {
            name,
            arity: Arity::Value,
            repeatable: true,
        }
    }
    /// A flag without a value.
    pub const fn flag(name: &'static str) -> Self {
        OptionSpec {
            name,
            arity: Arity::Flag,
            repeatable: false,
        }
    }
    /// An option whose value may be omitted.
    pub const fn optional(name: &'static str) -> Self {
        OptionSpec {
            name,
            arity: Arity::OptionalValue,
            repeatable: false,
        }
    }
}

/// A command-line error; the message names the offending option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    /// The option is not in the table.
    #[error("unknown option '{0}'")]
    Unknown(String),
    /// A bare word where an option was expected.
    #[error("unexpected argument '{0}': options start with '-'")]
    Positional(String),
    /// The option needs a value but none followed.
    #[error("option '-{0}' requires a value")]
    MissingValue(String),
    /// The option was given twice but may appear only once.
    #[error("option '-{0}' given more than once")]
    Duplicate(String),
    /// A `key=value` list item is malformed.
    #[error("option '-{option}': malformed item '{item}' (expected key=value)")]
    MalformedItem {
        /// Option being parsed.
        option: String,
        /// The offending item.
        item: String,
    },
    /// A `key=value` list has a key twice.
    #[error("option '-{option}': key '{key}' given more than once")]
    DuplicateKey {
        /// Option being parsed.
        option: String,
        /// The repeated key.
        key: String,
    },
    /// A key the option does not know.
    #[error("option '-{option}': unknown parameter '{key}'")]
    UnknownKey {
        /// Option being parsed.
        option: String,
        /// The unknown key.
        key: String,
    },
    /// A value outside what the option accepts.
    #[error("option '-{option}': invalid value '{value}' for '{key}': {reason}")]
    InvalidValue {
        /// Option being parsed.
        option: String,
        /// Key (or the option name for a plain value).
        key: String,
        /// The offending value.
        value: String,
        /// What is accepted.
        reason: String,
    },
}

/// The parsed command line: every option given, in order, with its value.
#[derive(Debug, Default)]
pub struct ParsedOptions {
    values: HashMap<&'static str, Vec<Option<String>>>,
}

impl ParsedOptions {
    /// Whether the option was given at all.
    pub fn has(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// The value of a single-use option (`None` if absent or given without a value).
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.first())
            .and_then(|v| v.as_deref())
    }

    /// All values of a repeatable option, in command-line order.
    pub fn values(&self, name: &str) -> impl Iterator<Item = &str> {
        self.values
            .get(name)
            .into_iter()
            .flat_map(|v| v.iter().filter_map(|v| v.as_deref()))
    }
}

/// Parses `args` (without the program name) against `specs`.
///
/// Options may be spelled `-name` or `--name`; `-name=value` is not accepted, as in
/// StratoVirt.
pub fn parse<I, S>(specs: &[OptionSpec], args: I) -> Result<ParsedOptions, OptionError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut parsed = ParsedOptions::default();
    let mut args = args.into_iter().map(Into::into).peekable();
    while let Some(arg) = args.next() {
        let name = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| OptionError::Positional(arg.clone()))?;
        let spec = specs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| OptionError::Unknown(arg.clone()))?;
        let value = match spec.arity {
            Arity::Flag => None,
            Arity::Value => Some(
                args.next()
                    .ok_or_else(|| OptionError::MissingValue(spec.name.to_string()))?,
            ),
            Arity::OptionalValue => args.next_if(|next| !looks_like_option(next)),
        };
        let entry = parsed.values.entry(spec.name).or_default();
        if !entry.is_empty() && !spec.repeatable {
            return Err(OptionError::Duplicate(spec.name.to_string()));
        }
        entry.push(value);
    }
    Ok(parsed)
}

/// A word starting with '-' followed by a letter is the next option, not a value
/// (`-D -disable-seccomp`); "-1" or "-" alone are values.
fn looks_like_option(word: &str) -> bool {
    let rest = word.strip_prefix("--").or_else(|| word.strip_prefix('-'));
    matches!(rest.and_then(|r| r.chars().next()), Some(c) if c.is_ascii_alphabetic())
}

/// A parsed `key=value,key=value` list, as StratoVirt option values are written.
#[derive(Debug, Default)]
pub struct KeyValues {
    option: String,
    items: Vec<(String, String)>,
}

impl KeyValues {
    /// Parses `text` for `option`. An item without `=` is taken as the value of
    /// `implicit_key` when it is the first item (`-machine microvm` = `-machine type=microvm`).
    pub fn parse(
        option: &str,
        text: &str,
        implicit_key: Option<&str>,
    ) -> Result<Self, OptionError> {
        let mut kv = KeyValues {
            option: option.to_string(),
            items: Vec::new(),
        };
        for (index, item) in text.split(',').enumerate() {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) if !k.is_empty() => (k.to_string(), v.to_string()),
                None if index == 0 && implicit_key.is_some() && !item.is_empty() => (
                    implicit_key.unwrap_or_default().to_string(),
                    item.to_string(),
                ),
                _ => {
                    return Err(OptionError::MalformedItem {
                        option: option.to_string(),
                        item: item.to_string(),
                    })
                }
            };
            if kv.items.iter().any(|(k, _)| *k == key) {
                return Err(OptionError::DuplicateKey {
                    option: option.to_string(),
                    key,
                });
            }
            kv.items.push((key, value));
        }
        Ok(kv)
    }

    /// Fails on any key not in `known`: a typo must not be silently ignored.
    pub fn check_keys(&self, known: &[&str]) -> Result<(), OptionError> {
        match self
            .items
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((key, _)) => Err(OptionError::UnknownKey {
                option: self.option.clone(),
                key: key.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// An `on|off` (also `true|false`) switch.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, OptionError> {
        self.get(key)
            .map(|v| match v {
                "on" | "true" => Ok(true),
                "off" | "false" => Ok(false),
                _ => Err(self.invalid(key, v, "expected on or off")),
            })
            .transpose()
    }

    /// Builds an [`OptionError::InvalidValue`] for this option.
    pub fn invalid(&self, key: &str, value: &str, reason: &str) -> OptionError {
        OptionError::InvalidValue {
            option: self.option.clone(),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptionSpec] = &[
        OptionSpec::value("kernel"),
        OptionSpec::repeated("device"),
        OptionSpec::flag("daemonize"),
        OptionSpec::optional("D"),
        OptionSpec::flag("disable-seccomp"),
    ];

    fn p(args: &[&str]) -> Result<ParsedOptions, OptionError> {
        parse(SPECS, args.iter().copied())
    }

    #[test]
    fn values_flags_and_repeats() {
        let o = p(&[
            "-kernel",
            "vmlinuz",
            "-device",
            "a",
            "--device",
            "b",
            "-daemonize",
        ])
        .unwrap();
        assert_eq!(o.value("kernel"), Some("vmlinuz"));
        assert_eq!(o.values("device").collect::<Vec<_>>(), ["a", "b"]);
        assert!(o.has("daemonize"));
        assert!(!o.has("D"));
    }

    #[test]
    fn optional_value_does_not_swallow_next_option() {
        let o = p(&["-D", "-disable-seccomp"]).unwrap();
        assert!(o.has("D"));
        assert_eq!(o.value("D"), None);
        assert!(o.has("disable-seccomp"));
        let o = p(&["-D", "/tmp/log"]).unwrap();
        assert_eq!(o.value("D"), Some("/tmp/log"));
        let o = p(&["-D"]).unwrap();
        assert!(o.has("D"));
    }

    #[test]
    fn errors_name_the_option() {
        assert_eq!(
            p(&["-bogus"]).unwrap_err(),
            OptionError::Unknown("-bogus".into())
        );
        assert_eq!(
            p(&["-kernel"]).unwrap_err(),
            OptionError::MissingValue("kernel".into())
        );
        assert_eq!(
            p(&["-kernel", "a", "-kernel", "b"]).unwrap_err(),
            OptionError::Duplicate("kernel".into())
        );
        assert_eq!(
            p(&["stray"]).unwrap_err(),
            OptionError::Positional("stray".into())
        );
        assert_eq!(p(&["-"]).unwrap_err(), OptionError::Positional("-".into()));
        assert!(p(&["-kernel", "a", "-kernel", "b"])
            .unwrap_err()
            .to_string()
            .contains("-kernel"));
    }

    #[test]
    fn key_values() {
        let kv = KeyValues::parse("machine", "microvm,mem-share=on", Some("type")).unwrap();
        assert_eq!(kv.get("type"), Some("microvm"));
        assert_eq!(kv.get_bool("mem-share").unwrap(), Some(true));
        assert!(kv.check_keys(&["type", "mem-share"]).is_ok());
        assert!(matches!(
            kv.check_keys(&["type"]),
            Err(OptionError::UnknownKey { .. })
        ));
        assert!(KeyValues::parse("smp", "2,2", Some("cpus")).is_err());
        assert!(KeyValues::parse("smp", "cpus=2,cpus=3", None).is_err());
        assert!(KeyValues::parse("smp", "cpus=2,,", None).is_err());
        let kv = KeyValues::parse("x", "a=maybe", None).unwrap();
        assert!(kv.get_bool("a").is_err());
    }
}
