//! Config files (`--config PATH`, TOML) for the daemons' long-running subcommands (`lattice
//! up`, `lattice-coordinator serve`, `lattice-relay serve`).
//!
//! A file's keys are the subcommand's long flags (`listen = "0.0.0.0:8080"`, `advertise-routes
//! = ["10.33.0.0/24"]`, `accept-dns = true`). It is turned into flags put before the ones on
//! the command line, so the usual order holds: a flag on the command line wins over its
//! environment variable, which wins over the file, which wins over the default. An unknown
//! key, a value of the wrong type or a file that does not parse is an error naming
//! `file:line:col`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::ArgAction;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Something in it is wrong.
    #[error("{path}:{line}:{col}: {message}")]
    At {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        message: String,
    },
}

/// Parses this process's command line as `P`, with the flags of a `--config` file given to
/// `subcommand` put before the command line's own. A file that cannot be used is reported on
/// stderr as `program: file:line:col: why`, and the process should exit with the code
/// returned.
pub fn parse<P: clap::Parser>(
    subcommand: &str,
    program: &str,
) -> Result<P, std::process::ExitCode> {
    match expand(&P::command(), subcommand, std::env::args_os().collect()) {
        Ok(argv) => Ok(P::parse_from(argv)),
        Err(e) => {
            eprintln!("{program}: {e}");
            Err(std::process::ExitCode::FAILURE)
        }
    }
}

/// `argv` (program name first) with the flags of the `--config` file, if one is named, put
/// right after `subcommand` (which `cmd` must have). Without `--config`, `argv` unchanged.
pub fn expand(
    cmd: &clap::Command,
    subcommand: &str,
    argv: Vec<OsString>,
) -> Result<Vec<OsString>, ConfigError> {
    let Some(at) = argv.iter().position(|a| a == subcommand) else {
        return Ok(argv);
    };
    let Some(path) = config_path(&argv[at + 1..]) else {
        return Ok(argv);
    };
    let Some(sub) = cmd.find_subcommand(subcommand) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let given: Vec<String> = argv[at + 1..]
        .iter()
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect();
    // Global flags (`--log-format`) may be set in the file too.
    let mut sub = sub.clone();
    for g in cmd.get_arguments().filter(|a| a.is_global_set()) {
        if sub.get_arguments().all(|a| a.get_id() != g.get_id()) {
            sub = sub.arg(g.clone());
        }
    }
    let flags = flags_from(&path, &text, &sub, &given)?;
    let mut out = argv[..=at].to_vec();
    out.extend(flags.into_iter().map(OsString::from));
    out.extend(argv[at + 1..].iter().cloned());
    Ok(out)
}

/// The path after `--config` (or in `--config=PATH`).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_str()?;
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// The flags a config file stands for. Keys given on the command line (`given`) or through
/// their environment variable are left out: those win.
fn flags_from(
    path: &Path,
    text: &str,
    sub: &clap::Command,
    given: &[String],
) -> Result<Vec<String>, ConfigError> {
    let at = |offset: usize, message: String| {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError::At {
            path: path.display().to_string(),
            line,
            col,
            message,
        }
    };
    let doc = toml_edit::Document::parse(text.to_owned()).map_err(|e| {
        at(
            e.span().map_or(0, |s| s.start),
            e.message().trim().to_owned(),
        )
    })?;
    let known: Vec<&str> = sub
        .get_arguments()
        .filter_map(clap::Arg::get_long)
        .filter(|l| *l != "config" && *l != "help")
        .collect();
    let mut flags = Vec::new();
    for (key, item) in doc.as_table().iter() {
        let span = doc
            .as_table()
            .key(key)
            .and_then(toml_edit::Key::span)
            .map_or(0, |s| s.start);
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(key) && key != "config" && key != "help")
        else {
            return Err(at(
                span,
                format!(
                    "unknown key {key:?} (keys are the long flags of `{}`: {})",
                    sub.get_name(),
                    known.join(", ")
                ),
            ));
        };
        if given.iter().any(|g| g == key)
            || arg.get_env().is_some_and(|v| std::env::var_os(v).is_some())
        {
            continue;
        }
        let value_at = item.span().map_or(span, |s| s.start);
        let wrong = |what: &str| at(value_at, format!("{key} must be {what}"));
        let scalar = |v: &toml_edit::Value| -> Option<String> {
            match v {
                toml_edit::Value::String(s) => Some(s.value().clone()),
                toml_edit::Value::Integer(i) => Some(i.value().to_string()),
                toml_edit::Value::Float(f) => Some(f.value().to_string()),
                toml_edit::Value::Boolean(b) => Some(b.value().to_string()),
                _ => None,
            }
        };
        let Some(value) = item.as_value() else {
            return Err(wrong("a value, not a table"));
        };
        match arg.get_action() {
            ArgAction::SetTrue => match value.as_bool() {
                Some(true) => flags.push(format!("--{key}")),
                Some(false) => {}
                None => return Err(wrong("true or false")),
            },
            ArgAction::Append => {
                let values: Vec<String> = match value {
                    toml_edit::Value::Array(a) => a
                        .iter()
                        .map(|v| scalar(v).ok_or_else(|| wrong("an array of strings or numbers")))
                        .collect::<Result<_, _>>()?,
                    v => vec![scalar(v).ok_or_else(|| wrong("a string, a number or an array"))?],
                };
                for v in values {
                    flags.push(format!("--{key}={v}"));
                }
            }
            _ => {
                let v = scalar(value).ok_or_else(|| wrong("a string, a number or a boolean"))?;
                flags.push(format!("--{key}={v}"));
            }
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cmd() -> Command {
        Command::new("lattice").subcommand(
            Command::new("up")
                .arg(Arg::new("config").long("config"))
                .arg(
                    Arg::new("coordinator")
                        .long("coordinator")
                        .env("TEST_CFG_COORD"),
                )
                .arg(Arg::new("port").long("port"))
                .arg(
                    Arg::new("accept-dns")
                        .long("accept-dns")
                        .action(ArgAction::SetTrue),
                )
                .arg(
                    Arg::new("advertise-routes")
                        .long("advertise-routes")
                        .action(ArgAction::Append),
                ),
        )
    }

    /// `lattice up --config F EXTRA...` with `text` in F; the file's path reads `F`.
    fn run(text: &str, extra: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lattice.toml");
        std::fs::write(&path, text).unwrap();
        let shown = path.display().to_string();
        let mut argv: Vec<OsString> = vec!["lattice".into(), "up".into()];
        argv.push("--config".into());
        argv.push(path.clone().into());
        argv.extend(extra.iter().map(OsString::from));
        match expand(&cmd(), "up", argv) {
            Ok(v) => Ok(v
                .into_iter()
                .map(|a| a.to_string_lossy().replace(&shown, "F"))
                .collect()),
            Err(e) => Err(e.to_string().replace(&shown, "F")),
        }
    }

    #[test]
    fn a_file_becomes_flags_that_the_command_line_overrides() {
        let got = run(
            "# a comment\ncoordinator = \"http://c:8080\"\nport = 41642\naccept-dns = true\n\
             advertise-routes = [\"10.33.0.0/24\", \"10.34.0.0/24\"]\n",
            &["--port", "9"],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "lattice",
                "up",
                "--coordinator=http://c:8080",
                "--accept-dns",
                "--advertise-routes=10.33.0.0/24",
                "--advertise-routes=10.34.0.0/24",
                "--config",
                "F",
                "--port",
                "9"
            ],
            "port comes from the command line only"
        );
        // A flag's environment variable wins over the file too.
        // SAFETY: this test alone reads or writes this variable.
        unsafe { std::env::set_var("TEST_CFG_COORD", "http://env:1") };
        let got = run("coordinator = \"http://c:8080\"\n", &[]).unwrap();
        unsafe { std::env::remove_var("TEST_CFG_COORD") };
        assert!(
            !got.iter().any(|a| a.starts_with("--coordinator")),
            "{got:?}"
        );
        // Without --config nothing changes.
        let argv: Vec<OsString> = vec!["lattice".into(), "up".into(), "--port".into(), "1".into()];
        assert_eq!(expand(&cmd(), "up", argv.clone()).unwrap(), argv);
    }

    #[test]
    fn mistakes_name_their_place() {
        let msg = |text: &str| run(text, &[]).unwrap_err();
        assert_eq!(
            msg("port = 1\n  colour = \"blue\"\n"),
            "F:2:3: unknown key \"colour\" (keys are the long flags of `up`: coordinator, \
             port, accept-dns, advertise-routes)"
        );
        assert_eq!(
            msg("accept-dns = \"yes\"\n"),
            "F:1:14: accept-dns must be true or false"
        );
        assert_eq!(
            msg("[port]\nx = 1\n"),
            "F:1:1: port must be a value, not a table"
        );
        assert!(
            msg("port = = 1\n").starts_with("F:1:8: "),
            "{}",
            msg("port = = 1\n")
        );
        assert_eq!(
            msg("advertise-routes = [{a = 1}]\n"),
            "F:1:20: advertise-routes must be an array of strings or numbers"
        );
        let missing = expand(
            &cmd(),
            "up",
            vec![
                "lattice".into(),
                "up".into(),
                "--config".into(),
                "/nonexistent/x.toml".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            missing.starts_with("reading /nonexistent/x.toml:"),
            "{missing}"
        );
    }
}
