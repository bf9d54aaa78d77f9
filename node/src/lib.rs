//! The Lattice node: `lattice up` runs the daemon (the I/O shell around `node-proto`), the
//! other commands talk to it over its local API.

pub mod cli;
pub mod daemon;
pub mod io;
mod output;
pub mod statedir;

use anyhow::{Context, bail};
use hyper::{Method, StatusCode};

use crate::cli::Command;
use crate::io::api::{self, StatusJson, WhoisJson};
use crate::statedir::StateDir;

/// Runs a parsed command.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => daemon::up(*args).await,
        Command::Status { json, state } => {
            let sd = StateDir::existing(&state.state_dir);
            let (code, body) = api::call(&sd.socket(), Method::GET, "/v1/status").await?;
            if code != StatusCode::OK {
                bail!("the daemon answered {code}");
            }
            let st: StatusJson = serde_json::from_slice(&body).context("decoding status")?;
            if json {
                output::json(&st);
            } else {
                output::status(&st);
            }
            Ok(())
        }
        Command::Whois { ip, json, state } => {
            let sd = StateDir::existing(&state.state_dir);
            let (code, body) =
                api::call(&sd.socket(), Method::GET, &format!("/v1/whois/{ip}")).await?;
            if code == StatusCode::NOT_FOUND {
                bail!("no node in this mesh owns {ip}");
            }
            if code != StatusCode::OK {
                bail!("the daemon answered {code}");
            }
            let w: WhoisJson = serde_json::from_slice(&body).context("decoding whois")?;
            if json {
                output::json(&w);
            } else {
                output::whois(&w);
            }
            Ok(())
        }
        Command::Netcheck { json, state } => {
            let sd = StateDir::existing(&state.state_dir);
            let (code, body) = api::call(&sd.socket(), Method::POST, "/v1/netcheck").await?;
            if code != StatusCode::OK {
                bail!("the daemon answered {code}");
            }
            let n: api::NetcheckJson =
                serde_json::from_slice(&body).context("decoding netcheck")?;
            if json {
                output::json(&n);
            } else {
                output::netcheck(&n);
            }
            Ok(())
        }
        Command::Ping {
            target,
            count,
            json,
            state,
        } => {
            let sd = StateDir::existing(&state.state_dir);
            let mut answered = 0u32;
            for i in 0..count {
                if i > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                let path = format!("/v1/ping/{}", urlencode(&target));
                let (code, body) = api::call(&sd.socket(), Method::POST, &path).await?;
                if code == StatusCode::OK {
                    let p: api::PingJson =
                        serde_json::from_slice(&body).context("decoding a ping reply")?;
                    answered += 1;
                    if json {
                        output::json(&p);
                    } else {
                        output::ping(&p);
                    }
                } else {
                    let why = String::from_utf8_lossy(&body).into_owned();
                    if code == StatusCode::UNPROCESSABLE_ENTITY && why.starts_with("no peer named")
                    {
                        bail!("{why}");
                    }
                    output::line(&format!("no reply from {target}: {why}"));
                }
            }
            if answered == 0 {
                bail!("no reply from {target}");
            }
            Ok(())
        }
        Command::Down { state } => {
            let sd = StateDir::existing(&state.state_dir);
            api::call(&sd.socket(), Method::POST, "/v1/down").await?;
            output::line("stopped");
            Ok(())
        }
        Command::Login { timeout, state } => {
            login(&StateDir::existing(&state.state_dir), timeout).await
        }
        Command::RequestAccess {
            to,
            ports,
            duration,
            reason,
            json,
            state,
        } => {
            let sd = StateDir::existing(&state.state_dir);
            let body = serde_json::to_value(api::AccessRequestJson {
                to: to.clone(),
                ports: ports.clone(),
                for_secs: duration.as_secs(),
                reason,
            })?;
            let (code, answer) = api::call_with(
                &sd.socket(),
                Method::POST,
                "/v1/request-access",
                Some(&body),
            )
            .await?;
            if code != StatusCode::OK {
                bail!(
                    "access request refused: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&answer).context("decoding")?;
            if json {
                output::json(&v);
            } else {
                let id = v["id"].as_i64().unwrap_or_default();
                output::line(&format!(
                    "access request {id} filed: {to} ports {ports} for {}; an approver runs \
                     `lattice-coordinator access approve {id}`",
                    humantime::format_duration(duration)
                ));
            }
            Ok(())
        }
        Command::Logout { state } => {
            let sd = StateDir::existing(&state.state_dir);
            let (code, body) = api::call(&sd.socket(), Method::POST, "/v1/logout").await?;
            if code != StatusCode::OK {
                bail!("logout failed: {}", String::from_utf8_lossy(&body));
            }
            output::line("logged out: this node left the mesh");
            Ok(())
        }
    }
}

/// `lattice login`: asks the daemon to sign its user in again, shows the sign-in link once it
/// arrives, and waits for the outcome.
async fn login(sd: &StateDir, timeout: std::time::Duration) -> anyhow::Result<()> {
    let (code, body) = api::call(&sd.socket(), Method::POST, "/v1/login").await?;
    if code != StatusCode::OK {
        bail!("cannot sign in: {}", String::from_utf8_lossy(&body));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut shown = None;
    loop {
        let (code, body) = api::call(&sd.socket(), Method::GET, "/v1/status").await?;
        if code != StatusCode::OK {
            bail!("the daemon answered {code}");
        }
        let st: StatusJson = serde_json::from_slice(&body).context("decoding status")?;
        if let Some(r) = st.login_result {
            return match (r.user, r.error) {
                (_, Some(e)) => bail!("the sign-in failed: {e}"),
                (user, None) => {
                    output::line(&format!(
                        "signed in as {}",
                        user.as_deref().unwrap_or("the node's user")
                    ));
                    Ok(())
                }
            };
        }
        if let Some(l) = st.login
            && shown.as_ref() != Some(&l.url)
        {
            output::line(&format!("To authenticate, visit: {}", l.url));
            output::line(&format!(
                "(the page shows the code {}; check it before you sign in)",
                l.user_code
            ));
            shown = Some(l.url);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no sign-in within {}", humantime::format_duration(timeout));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `s` as one URL path segment.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
