//! The Lattice coordinator: registration, netmap streaming, admin API and audit log.
//!
//! `main.rs` only parses flags and sets up logging; [`run`] does the rest.

pub mod addr;
pub mod admin_client;
pub mod api;
pub mod audit;
pub mod cli;
pub mod db;
pub mod error;
pub mod hub;
pub mod model;
pub mod netmap;
pub mod ops;
mod output;
pub mod register;
pub mod secret;
pub mod server;
pub mod state;

use anyhow::Context;
use hyper::Method;
use serde_json::json;

use crate::admin_client::Target;
use crate::audit::{Entry, Verification};
use crate::cli::{
    AdminArgs, AuditCommand, AuthkeyCommand, Command, NodesCommand, SettingsCommand, TokenCommand,
    TunnelSecurityArg,
};
use crate::model::AuthKeyInfo;
use crate::ops::{CreatedAuthKey, NodeView};

/// What `run` concluded, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1 (the command printed why).
    Failure,
}

/// Runs a parsed command.
pub async fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Serve(a) => {
            server::serve(server::ServeConfig {
                listen: a.listen,
                state_dir: a.state_dir,
                db: a.db,
                public_url: a.public_url,
                domain: a.domain,
                ephemeral_timeout: a.ephemeral_timeout,
            })
            .await?;
            Ok(Outcome::Success)
        }
        Command::Authkey { command } => authkey(command).await,
        Command::Nodes { command } => nodes(command).await,
        Command::Audit { command } => audit_cmd(command).await,
        Command::Token { command } => token(command).await,
        Command::Settings { command } => settings(command).await,
    }
}

async fn settings(cmd: SettingsCommand) -> anyhow::Result<Outcome> {
    let (admin, set, json) = match cmd {
        SettingsCommand::Get { json, admin } => (admin, None, json),
        SettingsCommand::SetTunnelSecurity { value, admin } => (admin, Some(value), false),
    };
    let t = target(&admin)?;
    let s: ops::Settings = match set {
        None => t.call(Method::GET, "/settings", None).await?,
        Some(v) => {
            let value = match v {
                TunnelSecurityArg::PostQuantum => "post_quantum",
                TunnelSecurityArg::ClassicalOnly => "classical_only",
            };
            t.call(
                Method::PUT,
                "/settings",
                Some(json!({"tunnel_security": value})),
            )
            .await?
        }
    };
    if json {
        output::json(&s);
    } else {
        let v = serde_json::to_value(s.tunnel_security).unwrap_or_default();
        output::line(&format!("tunnel_security: {}", v.as_str().unwrap_or("?")));
    }
    Ok(Outcome::Success)
}

fn target(a: &AdminArgs) -> anyhow::Result<Target> {
    Target::new(a.state_dir.clone(), a.server.clone(), a.token.clone())
}

async fn authkey(cmd: AuthkeyCommand) -> anyhow::Result<Outcome> {
    match cmd {
        AuthkeyCommand::Create {
            reusable,
            ephemeral,
            tags,
            user,
            expiry,
            json,
            admin,
        } => {
            let created: CreatedAuthKey = target(&admin)?
                .call(
                    Method::POST,
                    "/authkeys",
                    Some(json!({
                        "reusable": reusable,
                        "ephemeral": ephemeral,
                        "tags": tags,
                        "user": user,
                        "expiry_secs": expiry.as_secs(),
                    })),
                )
                .await?;
            if json {
                output::json(&created);
            } else {
                output::line(&created.key);
            }
        }
        AuthkeyCommand::List { json, admin } => {
            let keys: Vec<AuthKeyInfo> =
                target(&admin)?.call(Method::GET, "/authkeys", None).await?;
            if json {
                output::json(&keys);
            } else {
                output::auth_keys(&keys);
            }
        }
        AuthkeyCommand::Revoke { id, admin } => {
            let _: serde_json::Value = target(&admin)?
                .call(Method::POST, &format!("/authkeys/{id}/revoke"), None)
                .await?;
            output::line(&format!("revoked auth key {id}"));
        }
    }
    Ok(Outcome::Success)
}

async fn nodes(cmd: NodesCommand) -> anyhow::Result<Outcome> {
    match cmd {
        NodesCommand::List { json, admin } => {
            let nodes: Vec<NodeView> = target(&admin)?.call(Method::GET, "/nodes", None).await?;
            if json {
                output::json(&nodes);
            } else {
                output::nodes(&nodes);
            }
        }
        NodesCommand::Remove { name, admin } => {
            let _: serde_json::Value = target(&admin)?
                .call(Method::DELETE, &format!("/nodes/{name}"), None)
                .await?;
            output::line(&format!("removed node {name}"));
        }
        NodesCommand::Expire { name, admin } => {
            let _: serde_json::Value = target(&admin)?
                .call(Method::POST, &format!("/nodes/{name}/expire"), None)
                .await?;
            output::line(&format!("expired the key of node {name}"));
        }
    }
    Ok(Outcome::Success)
}

async fn audit_cmd(cmd: AuditCommand) -> anyhow::Result<Outcome> {
    match cmd {
        AuditCommand::List { json, after, admin } => {
            let entries = all_entries(&target(&admin)?, after).await?;
            if json {
                output::json(&entries);
            } else {
                output::audit(&entries);
            }
            Ok(Outcome::Success)
        }
        AuditCommand::Export { admin } => {
            for e in all_entries(&target(&admin)?, 0).await? {
                output::line(&serde_json::to_string(&e).context("encoding an entry")?);
            }
            Ok(Outcome::Success)
        }
        AuditCommand::Verify { json, admin } => {
            let v: Verification = target(&admin)?
                .call(Method::GET, "/audit/verify", None)
                .await?;
            if json {
                output::json(&v);
            } else if v.ok() {
                output::line(&format!("audit log intact: {} entries", v.entries));
            } else {
                output::line(&format!(
                    "audit log TAMPERED: {} problem(s) in {} entries",
                    v.problems.len(),
                    v.entries
                ));
                for p in &v.problems {
                    output::line(&format!("  {p}"));
                }
            }
            Ok(if v.ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            })
        }
    }
}

async fn all_entries(t: &Target, mut after: i64) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    loop {
        let page: Vec<Entry> = t
            .call(
                Method::GET,
                &format!("/audit?after={after}&limit=5000"),
                None,
            )
            .await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(page);
    }
    Ok(out)
}

async fn token(cmd: TokenCommand) -> anyhow::Result<Outcome> {
    match cmd {
        TokenCommand::Create { admin } => {
            let v: serde_json::Value = target(&admin)?.call(Method::POST, "/tokens", None).await?;
            output::line(v.get("token").and_then(|t| t.as_str()).unwrap_or_default());
        }
        TokenCommand::Revoke { id, admin } => {
            let _: serde_json::Value = target(&admin)?
                .call(Method::DELETE, &format!("/tokens/{id}"), None)
                .await?;
            output::line(&format!("revoked admin token {id}"));
        }
    }
    Ok(Outcome::Success)
}
