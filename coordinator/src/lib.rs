//! The Lattice coordinator: registration, netmap streaming, admin API and audit log.
//!
//! `main.rs` only parses flags and sets up logging; [`run`] does the rest.

pub mod addr;
pub mod admin_client;
pub mod admission;
pub mod api;
pub mod audit;
pub mod audit_store;
pub mod backup;
pub mod bucket;
pub mod cli;
pub mod conformance;
pub mod console;
pub mod db;
pub mod error;
pub mod federation;
pub mod feed;
pub mod hub;
pub mod jwks;
pub mod jwt;
pub mod metrics;
pub mod model;
pub mod netmap;
pub mod oidc;
pub mod ops;
mod output;
pub mod pacer;
pub mod presence;
pub mod register;
pub mod relays;
pub mod secret;
pub mod server;
pub mod state;

use anyhow::Context;
use hyper::Method;
use serde_json::json;

use crate::admin_client::Target;
use crate::audit::{Entry, Verification};
use crate::cli::{
    AccessCommand, AdminArgs, AuditCommand, AuthkeyCommand, Command, FederationCommand,
    NodesCommand, PolicyCommand, RelaysCommand, SettingsCommand, TokenCommand, TokenScopeArg,
    TunnelSecurityArg, UsersCommand,
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
            let a = *a;
            server::serve(server::ServeConfig {
                listen: a.listen,
                state_dir: a.state_dir,
                db: a.db,
                public_url: a.public_url,
                domain: a.domain,
                ephemeral_timeout: a.ephemeral_timeout,
                policy: a.policy,
                embedded_relay: !a.no_embedded_relay,
                relay_listen: a.relay_listen,
                relay_quic_threads: a
                    .relay_quic_threads
                    .map_or_else(relay::quic::default_threads_here, usize::from),
                relay_client_rate: a.relay_client_rate_limit.map(relay::ClientRate::mbit),
                stun_listen: a.stun_listen,
                admin_listen: a.admin_listen,
                metrics_listen: a.metrics_listen,
                federation_ca_file: a.federation_ca_file,
                oidc: match (a.oidc_issuer, a.oidc_client_id, a.oidc_client_secret_file) {
                    (Some(issuer), Some(client_id), Some(client_secret_file)) => {
                        Some(server::OidcServeConfig {
                            cfg: oidc::OidcConfig {
                                issuer,
                                client_id,
                                groups_claim: a.oidc_groups_claim,
                                allowed_domains: a.oidc_allowed_domains,
                                mfa_acr_values: a.oidc_mfa_acr,
                            },
                            client_secret_file,
                            admins: a.oidc_admins,
                            admin_groups: a.oidc_admin_groups,
                        })
                    }
                    _ => None,
                },
            })
            .await?;
            Ok(Outcome::Success)
        }
        Command::Authkey { command } => authkey(command).await,
        Command::Nodes { command } => nodes(command).await,
        Command::Audit { command } => audit_cmd(command).await,
        Command::Token { command } => token(command).await,
        Command::Backup {
            out,
            state: cli::StateDirArg { state_dir },
            db,
        } => {
            let s = backup::backup(&state_dir, db.as_deref(), &out).await?;
            output::line(&format!(
                "backed up {} into {}: {}",
                state_dir.display(),
                out.display(),
                s.files.join(", ")
            ));
            if !s.database {
                output::line(
                    "the database is PostgreSQL and was not copied: back it up with \
                     `pg_dump --format=custom DBNAME > FILE` (restore with pg_restore)",
                );
            }
            Ok(Outcome::Success)
        }
        Command::Restore {
            from,
            state: cli::StateDirArg { state_dir },
        } => {
            let s = backup::restore(&from, &state_dir).await?;
            output::line(&format!(
                "restored {} into {}: {}",
                from.display(),
                state_dir.display(),
                s.files.join(", ")
            ));
            if let Some(p) = &s.previous {
                output::line(&format!("what it held before is in {}", p.display()));
            }
            Ok(Outcome::Success)
        }
        Command::Settings { command } => settings(command).await,
        Command::Policy { command } => policy_cmd(command).await,
        Command::Relays { command } => relays_cmd(command).await,
        Command::Federation { command } => federation_cmd(command).await,
        Command::Users { command } => users_cmd(command).await,
        Command::Access { command } => access_cmd(command).await,
        Command::Login {
            server,
            cert_sha256,
            timeout,
        } => admin_login(&server, &cert_sha256, timeout).await,
    }
}

async fn access_cmd(cmd: AccessCommand) -> anyhow::Result<Outcome> {
    type Req = db::access::AccessRequest;
    match cmd {
        AccessCommand::List { all, json, admin } => {
            let list: Vec<Req> = target(&admin)?
                .call(Method::GET, &format!("/access?all={all}"), None)
                .await?;
            if json {
                output::json(&list);
            } else {
                output::access_requests(&list);
            }
        }
        AccessCommand::Approve { id, admin } => {
            let r: Req = target(&admin)?
                .call(Method::POST, &format!("/access/{id}/approve"), None)
                .await?;
            output::line(&format!(
                "access request {id} approved: {} may reach {} ports {} until {}",
                r.node_name,
                r.dst,
                r.ports,
                output::time(r.expires_at.unwrap_or_default())
            ));
        }
        AccessCommand::Deny { id, admin } => {
            let r: Req = target(&admin)?
                .call(Method::POST, &format!("/access/{id}/deny"), None)
                .await?;
            output::line(&format!(
                "access request {id} denied ({} asked for {} ports {})",
                r.node_name, r.dst, r.ports
            ));
        }
    }
    Ok(Outcome::Success)
}

/// `login`: a person's sign-in to the admin API.
async fn admin_login(
    server: &str,
    cert_sha256: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<Outcome> {
    let pin = wire::keys::parse_hex::<32>(cert_sha256.trim())
        .context("--cert-sha256 must be 64 hex digits")?;
    let t = Target::pinned(server, pin)?;
    let start: ops::people::AdminLoginStart =
        t.call_at(Method::POST, "/admin/login/start", None).await?;
    output::error_line(&format!("To authenticate, visit: {}", start.url));
    output::error_line(&format!(
        "(the page shows the code {}; check it before you sign in)",
        start.user_code
    ));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let poll: ops::people::AdminPoll = t
            .call_at(
                Method::POST,
                "/admin/login/poll",
                Some(json!({"poll_token": start.poll_token})),
            )
            .await?;
        if let ops::people::AdminPoll::Done { token, user, .. } = poll {
            output::error_line(&format!("signed in as {user}; the token lasts 12 hours"));
            output::line(&token);
            return Ok(Outcome::Success);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("no sign-in within {}", humantime::format_duration(timeout));
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn users_cmd(cmd: UsersCommand) -> anyhow::Result<Outcome> {
    match cmd {
        UsersCommand::List { json, admin } => {
            let users: Vec<ops::people::UserView> =
                target(&admin)?.call(Method::GET, "/users", None).await?;
            if json {
                output::json(&users);
            } else {
                output::users(&users);
            }
        }
        UsersCommand::SetKeyExpiry {
            user,
            expiry,
            admin,
        } => {
            let secs = expiry.0.map(|d| d.as_secs().max(1));
            let _: serde_json::Value = target(&admin)?
                .call(
                    Method::PUT,
                    &format!("/users/{}/key-expiry", oidc::form_encode(&user)),
                    Some(json!({"key_expiry_secs": secs})),
                )
                .await?;
            output::line(&match secs {
                Some(s) => format!(
                    "{user}'s node keys last {} from their next sign-in",
                    humantime::format_duration(std::time::Duration::from_secs(s))
                ),
                None => format!("{user}'s node keys last as long as the mesh's setting says"),
            });
        }
    }
    Ok(Outcome::Success)
}

async fn federation_cmd(cmd: FederationCommand) -> anyhow::Result<Outcome> {
    match cmd {
        FederationCommand::Add {
            issuer,
            audience,
            matches,
            tags,
            ephemeral: _,
            persistent,
            max_lifetime,
            json,
            admin,
        } => {
            let req = ops::federation::AddRule {
                issuer,
                audience,
                matches,
                tags,
                ephemeral: !persistent,
                max_lifetime_s: max_lifetime.map(|d| d.as_secs()),
            };
            let r: federation::TrustRule = target(&admin)?
                .call(
                    Method::POST,
                    "/federation",
                    Some(serde_json::to_value(&req)?),
                )
                .await?;
            if json {
                output::json(&r);
            } else {
                output::line(&format!(
                    "federation rule {}: tokens from {} for {} join as {}",
                    r.id,
                    r.issuer,
                    r.audience,
                    r.tags.join(",")
                ));
            }
        }
        FederationCommand::List { json, admin } => {
            let rules: Vec<federation::TrustRule> = target(&admin)?
                .call(Method::GET, "/federation", None)
                .await?;
            if json {
                output::json(&rules);
            } else {
                output::federation(&rules);
            }
        }
        FederationCommand::Remove { id, admin } => {
            let _: federation::TrustRule = target(&admin)?
                .call(Method::DELETE, &format!("/federation/{id}"), None)
                .await?;
            output::line(&format!("removed federation rule {id}"));
        }
    }
    Ok(Outcome::Success)
}

async fn relays_cmd(cmd: RelaysCommand) -> anyhow::Result<Outcome> {
    match cmd {
        RelaysCommand::Add {
            name,
            key,
            quic,
            cert_sha256,
            websocket,
            stun,
            admin,
        } => {
            let req = relays::AddRelay {
                name,
                key,
                quic,
                cert_sha256: cert_sha256
                    .map(|h| {
                        wire::keys::parse_hex::<32>(&h)
                            .map(wire::CertPin)
                            .context("--cert-sha256 must be 64 hex digits")
                    })
                    .transpose()?,
                websocket,
                stun,
            };
            let r: wire::RelayInfo = target(&admin)?
                .call(Method::POST, "/relays", Some(serde_json::to_value(&req)?))
                .await?;
            output::line(&format!("added relay {} (id {})", r.name, r.id.0));
        }
        RelaysCommand::List { json, admin } => {
            let list: Vec<wire::RelayInfo> =
                target(&admin)?.call(Method::GET, "/relays", None).await?;
            if json {
                output::json(&list);
            } else {
                output::relays(&list);
            }
        }
        RelaysCommand::Stats { json, admin } => {
            let s: relays::RelayStats = target(&admin)?
                .call(Method::GET, "/relay/stats", None)
                .await?;
            if json {
                output::json(&s);
            } else {
                output::line(&format!("sessions: {}", s.sessions.join(", ")));
                output::line(&serde_json::to_string_pretty(&s.counters).unwrap_or_default());
            }
        }
        RelaysCommand::Remove { name, admin } => {
            let _: serde_json::Value = target(&admin)?
                .call(Method::DELETE, &format!("/relays/{name}"), None)
                .await?;
            output::line(&format!("removed relay {name}"));
        }
    }
    Ok(Outcome::Success)
}

fn read_policy_file(path: &std::path::Path) -> anyhow::Result<ops::policy::PolicyText> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(ops::policy::PolicyText {
        file_name: path.display().to_string(),
        text,
    })
}

/// Said about a policy file with neither `acls` nor `grants`.
const OPEN_BY_DEFAULT: &str = "note: the file has no \"acls\" or \"grants\", so every node may \
     reach every node (as in Tailscale); add \"acls\": [] to allow nothing";

async fn policy_cmd(cmd: PolicyCommand) -> anyhow::Result<Outcome> {
    match cmd {
        PolicyCommand::Conformance { dir, json } => {
            let report = conformance::run(&dir)?;
            if json {
                output::json(&report);
            } else {
                output::conformance(&report);
            }
            Ok(Outcome::Success)
        }
        PolicyCommand::Check { file } => {
            let p = read_policy_file(&file)?;
            let now = jiff::Timestamp::now();
            match policy::Policy::check(&p.file_name, &p.text, now, None) {
                Ok(pol) => {
                    output::line(&format!(
                        "{}: ok ({}, {} passed)",
                        p.file_name,
                        plural(pol.rule_count(), "rule"),
                        plural(pol.test_count(), "test")
                    ));
                    if pol.open_by_default() {
                        output::line(OPEN_BY_DEFAULT);
                    }
                    for note in pol.notes() {
                        output::line(&format!("note: {note}"));
                    }
                    Ok(Outcome::Success)
                }
                Err(e) => {
                    for l in e.lines() {
                        output::error_line(&l);
                    }
                    output::error_line(&format!(
                        "{}: {}",
                        p.file_name,
                        plural(e.diagnostics.len(), "problem")
                    ));
                    Ok(Outcome::Failure)
                }
            }
        }
        PolicyCommand::Set { file, json, admin } => {
            let p = read_policy_file(&file)?;
            let out: ops::policy::SetOutcome = target(&admin)?
                .call(Method::PUT, "/policy", Some(serde_json::to_value(&p)?))
                .await?;
            if json {
                output::json(&out);
            } else if out.unchanged {
                output::line(&format!(
                    "policy v{} already in force (unchanged)",
                    out.version
                ));
            } else {
                output::line(&format!(
                    "policy v{} in force: {}, {} passed; access gained by {}, lost by {}",
                    out.version,
                    plural(out.rules, "rule"),
                    plural(out.tests, "test"),
                    plural(out.diff.gained_total, "pair"),
                    plural(out.diff.lost_total, "pair"),
                ));
                output::diff(&out.diff);
            }
            if !json && let Ok(pol) = policy::Policy::parse(&p.file_name, &p.text) {
                if pol.open_by_default() {
                    output::line(OPEN_BY_DEFAULT);
                }
                for note in pol.notes() {
                    output::line(&format!("note: {note}"));
                }
            }
            Ok(Outcome::Success)
        }
        PolicyCommand::Get {
            version,
            json,
            admin,
        } => {
            let t = target(&admin)?;
            let stored = match version {
                Some(v) => Some(
                    t.call::<db::policy::StoredPolicy>(
                        Method::GET,
                        &format!("/policy/versions/{v}"),
                        None,
                    )
                    .await?,
                ),
                None => {
                    let view: ops::policy::PolicyView =
                        t.call(Method::GET, "/policy", None).await?;
                    if json {
                        output::json(&view);
                        return Ok(Outcome::Success);
                    }
                    view.stored
                }
            };
            match stored {
                Some(s) if json => output::json(&s),
                Some(s) => output::raw(&s.text),
                None => output::raw(DEFAULT_POLICY_TEXT),
            }
            Ok(Outcome::Success)
        }
        PolicyCommand::Diff { file, json, admin } => {
            let p = read_policy_file(&file)?;
            let d: ops::policy::DiffView = target(&admin)?
                .call(
                    Method::POST,
                    "/policy/diff",
                    Some(serde_json::to_value(&p)?),
                )
                .await?;
            if json {
                output::json(&d);
            } else if d.gained.is_empty() && d.lost.is_empty() {
                output::line("no change in access");
            } else {
                output::diff(&d);
            }
            Ok(Outcome::Success)
        }
        PolicyCommand::Versions { json, admin } => {
            let v: Vec<db::policy::PolicyVersion> = target(&admin)?
                .call(Method::GET, "/policy/versions", None)
                .await?;
            if json {
                output::json(&v);
            } else {
                output::policy_versions(&v);
            }
            Ok(Outcome::Success)
        }
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// What `policy get` prints while no policy was ever set.
const DEFAULT_POLICY_TEXT: &str = "// No policy has been set: the built-in default is in force.
// Every node may reach every node on every protocol and port.
{
  \"acls\": [
    {\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]},
  ],
}
";

async fn settings(cmd: SettingsCommand) -> anyhow::Result<Outcome> {
    let (admin, set, json) = match cmd {
        SettingsCommand::Get { json, admin } => (admin, None, json),
        SettingsCommand::SetTunnelSecurity { value, admin } => {
            let value = match value {
                TunnelSecurityArg::PostQuantum => "post_quantum",
                TunnelSecurityArg::ClassicalOnly => "classical_only",
            };
            (admin, Some(json!({"tunnel_security": value})), false)
        }
        SettingsCommand::SetKeyExpiry { expiry, admin } => (
            admin,
            Some(json!({"key_expiry_secs": expiry.as_secs().max(1)})),
            false,
        ),
        SettingsCommand::SetReauthEvery { every, admin } => (
            admin,
            Some(json!({"reauth_every_secs": every.0.map_or(0, |d| d.as_secs().max(1))})),
            false,
        ),
    };
    let t = target(&admin)?;
    let s: ops::Settings = match set {
        None => t.call(Method::GET, "/settings", None).await?,
        Some(body) => t.call(Method::PUT, "/settings", Some(body)).await?,
    };
    if json {
        output::json(&s);
    } else {
        let v = serde_json::to_value(s.tunnel_security).unwrap_or_default();
        output::line(&format!("tunnel_security: {}", v.as_str().unwrap_or("?")));
        let dur = |s: i64| {
            humantime::format_duration(std::time::Duration::from_secs(s.max(0).unsigned_abs()))
                .to_string()
        };
        if let Some(k) = s.key_expiry_secs {
            output::line(&format!("key_expiry: {}", dur(k)));
        }
        output::line(&format!(
            "reauth_every: {}",
            s.reauth_every_secs.map_or_else(|| "off".to_owned(), dur)
        ));
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

/// Node `name` as `nodes list` shows it.
async fn node_view(admin: &AdminArgs, name: &str) -> anyhow::Result<NodeView> {
    let nodes: Vec<NodeView> = target(admin)?.call(Method::GET, "/nodes", None).await?;
    nodes
        .into_iter()
        .find(|n| n.name == name)
        .with_context(|| format!("no node named {name:?}"))
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
        NodesCommand::Routes {
            name,
            approve,
            unapprove,
            json,
            admin,
        } => {
            let routes: ops::RoutesView = if approve.is_empty() && unapprove.is_empty() {
                node_view(&admin, &name).await?.routes
            } else {
                target(&admin)?
                    .call(
                        Method::POST,
                        &format!("/nodes/{name}/routes"),
                        Some(json!({"approve": approve, "unapprove": unapprove})),
                    )
                    .await?
            };
            if json {
                output::json(&routes);
            } else {
                let list = |v: &[ipnet::IpNet]| {
                    if v.is_empty() {
                        "-".to_owned()
                    } else {
                        v.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                };
                output::line(&format!("advertised: {}", list(&routes.advertised)));
                output::line(&format!("approved:   {}", list(&routes.approved)));
                output::line(&format!("primary:    {}", list(&routes.primary)));
            }
        }
        NodesCommand::Attr {
            name,
            set,
            unset,
            json,
            admin,
        } => {
            let change = ops::policy::AttrChange {
                set: set
                    .into_iter()
                    .map(|(k, v)| (k, wire::AttrValue::from_text(&v)))
                    .collect(),
                unset,
            };
            let attrs: model::Attrs = if change.set.is_empty() && change.unset.is_empty() {
                node_view(&admin, &name).await?.custom_attrs
            } else {
                target(&admin)?
                    .call(
                        Method::PUT,
                        &format!("/nodes/{name}/attrs"),
                        Some(serde_json::to_value(&change)?),
                    )
                    .await?
            };
            if json {
                output::json(&attrs);
            } else {
                for (k, v) in &attrs {
                    output::line(&format!("{k}={v}"));
                }
            }
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
                output::line(&format!(
                    "audit log intact: {} entries, {} signed with the audit key",
                    v.entries, v.signed
                ));
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
        TokenCommand::Create {
            scope,
            expiry,
            json,
            admin,
        } => {
            let req = ops::CreateToken {
                scope: Some(match scope {
                    TokenScopeArg::Read => db::keys::TokenScope::Read,
                    TokenScopeArg::Write => db::keys::TokenScope::Write,
                }),
                expiry_secs: Some(expiry.as_secs()),
            };
            let created: ops::CreatedToken = target(&admin)?
                .call(Method::POST, "/tokens", Some(serde_json::to_value(&req)?))
                .await?;
            if json {
                output::json(&created);
            } else {
                output::line(&created.token);
            }
        }
        TokenCommand::List { json, admin } => {
            let tokens: Vec<db::keys::TokenInfo> =
                target(&admin)?.call(Method::GET, "/tokens", None).await?;
            if json {
                output::json(&tokens);
            } else {
                output::tokens(&tokens);
            }
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
