//! The checked form of a policy file.

use std::collections::BTreeMap;

use ipnet::IpNet;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use wire::AttrValue;

use crate::hujson::Pos;

/// Node attributes by name (`node:os`, `custom:team`, `fact:ok`).
pub type Attrs = BTreeMap<String, AttrValue>;

/// A checked policy file.
#[derive(Debug, Clone)]
pub(crate) struct PolicyFile {
    pub(crate) file: String,
    pub(crate) groups: BTreeMap<String, Vec<String>>,
    pub(crate) tag_owners: std::collections::BTreeSet<String>,
    pub(crate) hosts: BTreeMap<String, IpNet>,
    pub(crate) postures: BTreeMap<String, Vec<Condition>>,
    pub(crate) default_src_posture: Vec<String>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) tests: Vec<Test>,
    /// `accessRequests`: who may approve just-in-time access to what, and for how long.
    pub(crate) access_rules: Vec<AccessRule>,
    /// `autoApprovers`: who may advertise which routes (and exit routes) and have them
    /// approved without an admin.
    pub(crate) auto_approvers: AutoApprovers,
    /// The file has neither `acls` nor `grants`, so (as in Tailscale) it allows everything.
    pub(crate) open_by_default: bool,
    /// `nodeAttrs` (and the top-level `randomizeClientPort`): attributes given to nodes.
    pub(crate) node_attrs: Vec<NodeAttrs>,
    /// `ssh`: checked, and what `sshTests` run against; Lattice runs no SSH server.
    pub(crate) ssh_rules: Vec<SshRule>,
    /// `sshTests`.
    pub(crate) ssh_tests: Vec<SshTest>,
}

/// One `ssh` rule (`accept`, or `check`: accept after a fresh sign-in): who may log in as
/// whom on which nodes.
#[derive(Debug, Clone)]
pub(crate) struct SshRule {
    pub(crate) src: Vec<Selector>,
    pub(crate) dst: Vec<Selector>,
    pub(crate) users: Vec<SshUser>,
}

/// A login user an `ssh` rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SshUser {
    /// `root`, or any other literal name.
    Name(String),
    /// `autogroup:nonroot`: any user but root.
    NonRoot,
    /// `localpart:*@DOMAIN`: the local part of the source user's e-mail, for users of DOMAIN.
    LocalPart(String),
}

/// One `sshTests` entry: from `src`, to each of `dst`, the login users that must be allowed
/// (`accept`, `check`) and those that must not (`deny`).
#[derive(Debug, Clone)]
pub(crate) struct SshTest {
    pub(crate) pos: Pos,
    pub(crate) src: Selector,
    pub(crate) src_text: String,
    pub(crate) dst: Vec<(String, Selector)>,
    pub(crate) accept: Vec<String>,
    pub(crate) deny: Vec<String>,
}

/// One `nodeAttrs` entry: attributes (and app capabilities) for the nodes its targets name.
#[derive(Debug, Clone)]
pub(crate) struct NodeAttrs {
    /// `file:line:col`.
    pub(crate) origin: String,
    /// Which nodes (as sources are named).
    pub(crate) targets: Vec<Selector>,
    /// Attribute names, kept as written (`randomize-client-port`, `nextdns:ID`, a URL).
    pub(crate) attrs: Vec<String>,
    /// `ipPool`: address ranges to give these nodes (kept; Lattice allocates from the mesh
    /// range as before).
    pub(crate) ip_pool: Vec<IpNet>,
    /// `app`: capability name -> values.
    pub(crate) app: BTreeMap<String, Vec<serde_json::Value>>,
}

/// The `autoApprovers` section.
#[derive(Debug, Clone, Default)]
pub(crate) struct AutoApprovers {
    /// Route prefix -> who may have routes inside it approved (users, `group:`, `tag:`).
    pub(crate) routes: Vec<(IpNet, Vec<String>)>,
    /// Who may have exit routes approved.
    pub(crate) exit_node: Vec<String>,
}

/// One `accessRequests` entry.
#[derive(Debug, Clone)]
pub(crate) struct AccessRule {
    /// `file:line:col`.
    pub(crate) origin: String,
    /// The destinations one may ask for, as written (`tag:prod`).
    pub(crate) dst: Vec<String>,
    /// Who may approve.
    pub(crate) approvers: Vec<Selector>,
    /// The longest grant, seconds.
    pub(crate) max_secs: u64,
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Accept,
    Deny,
}

/// One access rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    /// `file:line:col` of the rule.
    pub(crate) origin: String,
    pub(crate) action: Action,
    pub(crate) src: Vec<Selector>,
    pub(crate) dst: Vec<Dst>,
    pub(crate) proto: Proto,
    /// Names of postures; the source must satisfy at least one. Empty: the policy's
    /// `defaultSrcPosture` applies (and if that is empty too, no posture is required).
    pub(crate) src_posture: Vec<String>,
    pub(crate) when: Option<Schedule>,
    pub(crate) not_before: Option<Timestamp>,
    pub(crate) expires: Option<Timestamp>,
    /// An app grant: the capabilities it grants the sources at the destinations. Such a rule
    /// admits no packet.
    pub(crate) caps: Option<BTreeMap<String, Vec<serde_json::Value>>>,
    /// A grant's `via`: its routed destinations (subnets, the internet) are reached only
    /// through routers with one of these tags, and the sources route them there.
    pub(crate) via: Vec<String>,
}

/// Who or what a selector names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    /// `*`: everyone (sources) or every node (destinations).
    Any,
    /// A user (`alice@example.com`).
    User(String),
    /// Every user of an e-mail domain (`user:*@example.com`; the domain is stored).
    UserDomain(String),
    /// `group:name`.
    Group(String),
    /// `idp:group:name`: user-owned nodes whose user's identity provider lists them in the
    /// group (refreshed at every sign-in).
    IdpGroup(String),
    /// `tag:name`.
    Tag(String),
    /// An address or prefix (written directly or through a `hosts` alias).
    Prefix(IpNet),
    /// `autogroup:member`: nodes owned by a user (not tagged).
    Member,
    /// `autogroup:tagged`: tagged nodes.
    Tagged,
    /// `autogroup:admin`: nodes owned by the mesh's admins (attribute `user:admin`, set by
    /// the coordinator).
    Admin,
    /// `autogroup:owner`: nodes owned by the mesh's owner (attribute `user:owner`).
    Owner,
    /// `autogroup:self` (destinations only): the source user's own untagged nodes.
    SelfNodes,
    /// `autogroup:internet` (destinations only): the internet through exit nodes (nodes
    /// with an approved exit route), the public address ranges only.
    Internet,
}

/// A destination: a selector and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dst {
    pub(crate) sel: Selector,
    pub(crate) ports: Ports,
}

/// Destination ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ports {
    Any,
    Ranges(Vec<(u16, u16)>),
}

impl Ports {
    pub(crate) fn contains(&self, port: u16) -> bool {
        match self {
            Self::Any => true,
            Self::Ranges(r) => r.iter().any(|(a, b)| *a <= port && port <= *b),
        }
    }

    pub(crate) fn ranges(&self) -> Vec<(u16, u16)> {
        match self {
            Self::Any => vec![(0, u16::MAX)],
            Self::Ranges(r) => r.clone(),
        }
    }
}

/// Which IP protocols a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Proto {
    /// Unspecified: TCP, UDP and ICMP (v4 and v6), as in Tailscale.
    Default,
    /// Every protocol.
    All,
    /// These protocol numbers.
    List(Vec<u8>),
}

impl Proto {
    pub(crate) fn covers(&self, proto: u8) -> bool {
        match self {
            Self::Default => matches!(proto, 1 | 6 | 17 | 58),
            Self::All => true,
            Self::List(l) => l.contains(&proto),
        }
    }
}

/// A recurring time window.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    /// Monday first.
    pub(crate) days: [bool; 7],
    /// Minutes after midnight, `[start, end)`; `end <= start` wraps past midnight. `None`: the
    /// whole day.
    pub(crate) hours: Option<(u16, u16)>,
    pub(crate) tz: TimeZone,
}

/// A comparison in a posture.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Condition {
    pub(crate) attr: String,
    pub(crate) op: Op,
    pub(crate) values: Vec<AttrValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    IsSet,
    NotSet,
}

/// A `tests` entry.
#[derive(Debug, Clone)]
pub(crate) struct Test {
    pub(crate) src: (Pos, Selector),
    pub(crate) src_text: String,
    pub(crate) src_attrs: Attrs,
    pub(crate) at: Option<Timestamp>,
    pub(crate) proto: Option<Vec<u8>>,
    pub(crate) accept: Vec<(Pos, String, Dst)>,
    pub(crate) deny: Vec<(Pos, String, Dst)>,
}
