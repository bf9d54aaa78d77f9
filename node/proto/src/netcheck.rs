//! Netcheck (sans-IO): what the network does to this node's UDP port, measured with STUN from
//! the main socket against every STUN server the relays offer.
//!
//! - Any answer: UDP works. No answer from any server: UDP looks blocked.
//! - The mapped address (public IP and port) each server saw. If two servers at different
//!   addresses saw different mappings, the NAT maps per destination (endpoint-dependent, "hard"):
//!   a mapped address is then useless to peers and only port probing or a relay helps.
//! - An endpoint-independent mapping is a good endpoint to advertise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, RngExt};
use wire::NatInfo;

/// How long a run waits for answers.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a run starts by itself.
pub const INTERVAL: Duration = Duration::from_secs(30);
/// How soon a run that could not tell whether the mapping varies (UDP works, but fewer than
/// two servers answered, e.g. a lost answer) runs again: until then a hard NAT looks like
/// an easy one, and its peers wait for a spray that is never asked for.
pub const INCOMPLETE_RETRY: Duration = Duration::from_secs(3);
/// Requests per server per run (one retransmission).
const TRIES: u32 = 2;
/// Most servers asked.
const MAX_SERVERS: usize = 6;

/// One server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerResult {
    /// The server.
    pub server: SocketAddr,
    /// The address it saw us at, if it answered.
    pub mapped: Option<SocketAddr>,
    /// Round-trip time of the first answer.
    pub rtt: Option<Duration>,
}

/// The result of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Per server.
    pub servers: Vec<ServerResult>,
    /// The NAT as it looks from here.
    pub nat: NatInfo,
    /// The endpoint worth advertising (an endpoint-independent mapping), if any.
    pub public_endpoint: Option<SocketAddr>,
}

/// The netcheck state machine.
#[derive(Debug, Default)]
pub struct Netcheck {
    servers: Vec<SocketAddr>,
    run: Option<Run>,
    next_run: Option<Instant>,
    last: Option<Report>,
    /// The last run could not tell and the next one was brought forward (once: a server that
    /// is down for good does not make every run early).
    brought_forward: bool,
}

#[derive(Debug)]
struct Run {
    started: Instant,
    /// tx id -> (server, sent at).
    pending: BTreeMap<[u8; 12], (SocketAddr, Instant)>,
    results: BTreeMap<SocketAddr, (SocketAddr, Duration)>,
    retried: bool,
}

impl Netcheck {
    /// Replaces the STUN servers (from the relays); a changed list starts a run.
    pub fn set_servers(&mut self, now: Instant, mut servers: Vec<SocketAddr>) {
        servers.dedup();
        servers.truncate(MAX_SERVERS);
        if servers != self.servers {
            self.servers = servers;
            self.next_run = Some(now);
        }
    }

    /// Whether there are STUN servers to ask (without, no run ever reports).
    pub fn has_servers(&self) -> bool {
        !self.servers.is_empty()
    }

    /// Asks for a run as soon as possible.
    pub fn trigger(&mut self, now: Instant) {
        if self.run.is_none() {
            self.next_run = Some(now);
        }
    }

    /// The last finished run.
    pub fn last(&self) -> Option<&Report> {
        self.last.as_ref()
    }

    /// When [`Self::poll`] has something to do next.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.run {
            Some(r) if !r.retried => Some(r.started + RUN_TIMEOUT / 2),
            Some(r) => Some(r.started + RUN_TIMEOUT),
            None if self.servers.is_empty() => None,
            None => self.next_run,
        }
    }

    /// Whether `from` is one of the STUN servers.
    pub fn is_server(&self, from: SocketAddr) -> bool {
        self.servers.contains(&from)
    }

    /// Timers. Returns requests to send from the main socket, and a report when a run
    /// finished.
    pub fn poll(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
    ) -> (Vec<(SocketAddr, Vec<u8>)>, Option<Report>) {
        let mut out = Vec::new();
        if self.run.is_none() && !self.servers.is_empty() && self.next_run.is_some_and(|t| t <= now)
        {
            let mut run = Run {
                started: now,
                pending: BTreeMap::new(),
                results: BTreeMap::new(),
                retried: false,
            };
            for s in &self.servers {
                let tx: [u8; 12] = rng.random();
                run.pending.insert(tx, (*s, now));
                out.push((*s, crate::stun::binding_request(tx)));
            }
            self.run = Some(run);
            self.next_run = Some(now + INTERVAL);
        }
        let Some(run) = &mut self.run else {
            return (out, None);
        };
        let elapsed = now.saturating_duration_since(run.started);
        if !run.retried && elapsed >= RUN_TIMEOUT / 2 {
            run.retried = true;
            for s in &self.servers {
                if run.results.contains_key(s) {
                    continue;
                }
                for _ in 1..TRIES {
                    let tx: [u8; 12] = rng.random();
                    run.pending.insert(tx, (*s, now));
                    out.push((*s, crate::stun::binding_request(tx)));
                }
            }
        }
        let all = self.servers.iter().all(|s| run.results.contains_key(s));
        if all || elapsed >= RUN_TIMEOUT {
            let report = self.finish();
            let unsure =
                report.nat.udp && report.nat.mapping_varies.is_none() && self.servers.len() >= 2;
            if unsure && !self.brought_forward {
                self.next_run = Some(now + INCOMPLETE_RETRY);
            }
            self.brought_forward = unsure && !self.brought_forward;
            return (out, Some(report));
        }
        (out, None)
    }

    /// A STUN response from `from`.
    pub fn handle_response(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) -> bool {
        let Some((tx, mapped)) = crate::stun::parse_response(bytes) else {
            return false;
        };
        let Some(run) = &mut self.run else {
            return false;
        };
        let Some((server, sent)) = run.pending.remove(&tx) else {
            return false;
        };
        if server != from {
            return false;
        }
        run.results
            .entry(server)
            .or_insert((mapped, now.saturating_duration_since(sent)));
        true
    }

    fn finish(&mut self) -> Report {
        let run = self.run.take().expect("finish is called with a run");
        let servers: Vec<ServerResult> = self
            .servers
            .iter()
            .map(|s| {
                let r = run.results.get(s);
                ServerResult {
                    server: *s,
                    mapped: r.map(|(m, _)| *m),
                    rtt: r.map(|(_, t)| *t),
                }
            })
            .collect();
        let mapped: Vec<SocketAddr> = servers.iter().filter_map(|r| r.mapped).collect();
        let mut distinct = mapped.clone();
        distinct.sort();
        distinct.dedup();
        let mapping_varies = (mapped.len() >= 2).then_some(distinct.len() > 1);
        let nat = NatInfo {
            udp: !mapped.is_empty(),
            mapping_varies,
            public_ip: mapped.first().map(SocketAddr::ip),
            port_mapped: None,
        };
        let public_endpoint = match (mapping_varies, distinct.as_slice()) {
            (Some(true), _) | (_, []) => None,
            (_, [one, ..]) => Some(*one),
        };
        let report = Report {
            servers,
            nat,
            public_endpoint,
        };
        self.last = Some(report.clone());
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn answer_all(
        n: &mut Netcheck,
        now: Instant,
        reqs: &[(SocketAddr, Vec<u8>)],
        map: impl Fn(SocketAddr) -> SocketAddr,
    ) {
        for (server, req) in reqs {
            let resp = relay::stun::answer(req, map(*server)).unwrap();
            assert!(n.handle_response(now, *server, &resp));
        }
    }

    #[test]
    fn an_endpoint_independent_mapping_is_advertised() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(1);
        let mut n = Netcheck::default();
        let s1: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let s2: SocketAddr = "198.51.100.2:3478".parse().unwrap();
        n.set_servers(now, vec![s1, s2]);
        let (reqs, done) = n.poll(now, &mut rng);
        assert_eq!(reqs.len(), 2);
        assert!(done.is_none());
        let public: SocketAddr = "203.0.113.7:41641".parse().unwrap();
        answer_all(&mut n, now, &reqs, |_| public);
        let (_, report) = n.poll(now + Duration::from_millis(10), &mut rng);
        let r = report.unwrap();
        assert!(r.nat.udp);
        assert_eq!(r.nat.mapping_varies, Some(false));
        assert!(!r.nat.is_hard());
        assert_eq!(r.public_endpoint, Some(public));
        assert_eq!(r.servers[0].rtt, Some(Duration::ZERO));
    }

    #[test]
    fn a_mapping_that_varies_by_destination_is_hard_nat() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(2);
        let mut n = Netcheck::default();
        let s1: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let s2: SocketAddr = "198.51.100.1:3479".parse().unwrap();
        n.set_servers(now, vec![s1, s2]);
        let (reqs, _) = n.poll(now, &mut rng);
        answer_all(&mut n, now, &reqs, |s| {
            SocketAddr::new("203.0.113.7".parse().unwrap(), 20000 + s.port())
        });
        let r = n.poll(now, &mut rng).1.unwrap();
        assert_eq!(r.nat.mapping_varies, Some(true));
        assert!(r.nat.is_hard());
        assert_eq!(r.public_endpoint, None);
    }

    #[test]
    fn a_run_that_cannot_tell_whether_the_mapping_varies_runs_again_soon() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(4);
        let mut n = Netcheck::default();
        let s1: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let s2: SocketAddr = "198.51.100.2:3478".parse().unwrap();
        n.set_servers(now, vec![s1, s2]);
        // Only s1 ever answers (s2's answers are lost, retransmission included).
        let (reqs, _) = n.poll(now, &mut rng);
        let only_s1: Vec<_> = reqs.into_iter().filter(|(s, _)| *s == s1).collect();
        answer_all(&mut n, now, &only_s1, |_| {
            "203.0.113.7:41641".parse().unwrap()
        });
        let (retry, _) = n.poll(now + RUN_TIMEOUT / 2, &mut rng);
        assert_eq!(retry.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![s2]);
        let r = n.poll(now + RUN_TIMEOUT, &mut rng).1.unwrap();
        assert!(r.nat.udp);
        assert_eq!(r.nat.mapping_varies, None);
        // Not in 30 s: in a few.
        assert_eq!(n.deadline(), Some(now + RUN_TIMEOUT + INCOMPLETE_RETRY));
        assert!(n.brought_forward);
        let (again, _) = n.poll(now + RUN_TIMEOUT + INCOMPLETE_RETRY, &mut rng);
        assert_eq!(again.len(), 2);
        // Both answer this time: a complete run, and the usual interval again.
        answer_all(&mut n, now, &again, |_| {
            "203.0.113.7:41641".parse().unwrap()
        });
        let t = now + RUN_TIMEOUT + INCOMPLETE_RETRY;
        let r = n.poll(t, &mut rng).1.unwrap();
        assert!(r.nat.mapping_varies.is_some());
        assert_eq!(n.deadline(), Some(t + INTERVAL));
        assert!(!n.brought_forward);
    }

    #[test]
    fn a_server_that_stays_silent_brings_only_one_run_forward() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(5);
        let mut n = Netcheck::default();
        let s1: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let s2: SocketAddr = "198.51.100.2:3478".parse().unwrap();
        n.set_servers(now, vec![s1, s2]);
        let mut t = now;
        let mut gaps = Vec::new();
        for _ in 0..3 {
            let (reqs, _) = n.poll(t, &mut rng);
            let only_s1: Vec<_> = reqs.into_iter().filter(|(s, _)| *s == s1).collect();
            answer_all(&mut n, t, &only_s1, |_| {
                "203.0.113.7:41641".parse().unwrap()
            });
            n.poll(t + RUN_TIMEOUT / 2, &mut rng);
            assert!(n.poll(t + RUN_TIMEOUT, &mut rng).1.is_some());
            let next = n.deadline().unwrap();
            gaps.push(next.saturating_duration_since(t));
            t = next;
        }
        assert_eq!(
            gaps,
            vec![
                RUN_TIMEOUT + INCOMPLETE_RETRY,
                INTERVAL,
                RUN_TIMEOUT + INCOMPLETE_RETRY
            ]
        );
    }

    #[test]
    fn no_answers_mean_udp_is_blocked_and_requests_are_retried_once() {
        let now = crate::test_epoch();
        let mut rng = StdRng::seed_from_u64(3);
        let mut n = Netcheck::default();
        n.set_servers(now, vec!["198.51.100.1:3478".parse().unwrap()]);
        assert_eq!(n.poll(now, &mut rng).0.len(), 1);
        let (retry, done) = n.poll(now + RUN_TIMEOUT / 2, &mut rng);
        assert_eq!(retry.len(), 1);
        assert!(done.is_none());
        let r = n.poll(now + RUN_TIMEOUT, &mut rng).1.unwrap();
        assert!(!r.nat.udp);
        assert_eq!(r.nat.mapping_varies, None);
        // A forged answer (unknown transaction) is ignored; the next run starts on schedule.
        let fake = relay::stun::answer(
            &crate::stun::binding_request([9; 12]),
            "1.2.3.4:5".parse().unwrap(),
        )
        .unwrap();
        assert!(!n.handle_response(now, "198.51.100.1:3478".parse().unwrap(), &fake));
        assert!(n.poll(now + RUN_TIMEOUT, &mut rng).0.is_empty());
        assert_eq!(n.poll(now + INTERVAL, &mut rng).0.len(), 1);
    }
}
