//! Overlay address allocation and node naming (pure).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::Ipv6Net;
use rand::Rng;

/// The overlay IPv4 range, 100.64.0.0/10 (RFC 6598 shared address space).
pub const CGNAT_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// Number of addresses in 100.64.0.0/10.
pub const CGNAT_SIZE: u32 = 1 << 22;
/// The node-local DNS resolver address, never allocated to a node.
pub const RESOLVER_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

/// Whether host offset `offset` inside 100.64.0.0/10 may be given to a node. Excludes the
/// network address, 100.100.100.0/24 (the resolver's block) and addresses ending in .0 or .255,
/// which some software treats specially.
pub fn allocatable(offset: u32) -> bool {
    if offset == 0 || offset >= CGNAT_SIZE {
        return false;
    }
    let ip = Ipv4Addr::from(CGNAT_BASE + offset);
    let o = ip.octets();
    !(o[3] == 0 || o[3] == 255 || (o[0] == 100 && o[1] == 100 && o[2] == 100))
}

/// The IPv4 address at `offset`.
pub fn ipv4_at(offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(CGNAT_BASE + offset)
}

/// Finds the first allocatable offset at or after `start` (wrapping around once) for which
/// `is_used` is false.
pub fn next_free(start: u32, mut is_used: impl FnMut(u32) -> bool) -> Option<u32> {
    let start = if start == 0 || start >= CGNAT_SIZE {
        1
    } else {
        start
    };
    (start..CGNAT_SIZE)
        .chain(1..start)
        .find(|&o| allocatable(o) && !is_used(o))
}

/// A random RFC 4193 unique local /48: `fd` followed by a 40-bit random global id.
pub fn random_ula(rng: &mut impl Rng) -> Ipv6Net {
    let mut id = [0u8; 5];
    rng.fill_bytes(&mut id);
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&id);
    Ipv6Net::new(Ipv6Addr::from(octets), 48).expect("48 is a valid prefix length")
}

/// A node's IPv6 address: the mesh /48 with the node's IPv4 address in the low 32 bits, so the
/// two addresses of a node are easy to tell apart and to relate.
pub fn ipv6_for(prefix: Ipv6Net, v4: Ipv4Addr) -> Ipv6Addr {
    let base = u128::from(prefix.network());
    Ipv6Addr::from(base | u128::from(u32::from(v4)))
}

/// Turns a requested hostname into a DNS label: lowercase `[a-z0-9-]`, no leading or trailing
/// dash, at most 63 characters. An empty result becomes `node`.
pub fn sanitize_hostname(requested: &str) -> String {
    let first_label = requested.split('.').next().unwrap_or_default();
    let mut out = String::with_capacity(first_label.len());
    for c in first_label.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches('-');
    let mut label: String = trimmed.chars().take(63).collect();
    while label.ends_with('-') {
        label.pop();
    }
    if label.is_empty() {
        "node".to_owned()
    } else {
        label
    }
}

/// `base` if free, else `base-1`, `base-2`, ... (shortening `base` to stay within 63 chars).
pub fn unique_name(base: &str, mut taken: impl FnMut(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_owned();
    }
    (1u32..)
        .map(|i| {
            let suffix = format!("-{i}");
            let keep = 63usize.saturating_sub(suffix.len());
            let stem: String = base.chars().take(keep).collect();
            format!("{}{suffix}", stem.trim_end_matches('-'))
        })
        .find(|candidate| !taken(candidate))
        .expect("an unbounded sequence of names has a free one")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn first_addresses_skip_reserved_ones() {
        assert_eq!(
            ipv4_at(next_free(0, |_| false).unwrap()),
            Ipv4Addr::new(100, 64, 0, 1)
        );
        // .255 and .0 are skipped
        let o = next_free(255, |_| false).unwrap();
        assert_eq!(ipv4_at(o), Ipv4Addr::new(100, 64, 1, 1));
        // the resolver's /24 is never handed out
        let start = u32::from(Ipv4Addr::new(100, 100, 100, 1)) - CGNAT_BASE;
        assert_eq!(
            ipv4_at(next_free(start, |_| false).unwrap()),
            Ipv4Addr::new(100, 100, 101, 1)
        );
    }

    #[test]
    fn allocation_wraps_around_to_free_gaps() {
        let used = |o: u32| o != 5;
        assert_eq!(next_free(CGNAT_SIZE - 3, used), Some(5));
        assert_eq!(next_free(10, |_| true), None);
    }

    #[test]
    fn ipv6_embeds_the_ipv4_address() {
        let prefix: Ipv6Net = "fd12:3456:789a::/48".parse().unwrap();
        assert_eq!(
            ipv6_for(prefix, Ipv4Addr::new(100, 64, 0, 7)),
            "fd12:3456:789a::6440:7".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn ula_is_an_fd_slash_48() {
        let ula = random_ula(&mut StdRng::seed_from_u64(3));
        assert_eq!(ula.prefix_len(), 48);
        assert_eq!(ula.network().octets()[0], 0xfd);
    }

    #[test]
    fn hostnames_become_dns_labels() {
        assert_eq!(sanitize_hostname("DB-1"), "db-1");
        assert_eq!(sanitize_hostname("web server #2"), "web-server-2");
        assert_eq!(sanitize_hostname("host.example.com"), "host");
        assert_eq!(sanitize_hostname("--"), "node");
        assert_eq!(sanitize_hostname(""), "node");
        assert_eq!(sanitize_hostname(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn names_are_made_unique() {
        let taken = ["db", "db-1"];
        assert_eq!(unique_name("db", |n| taken.contains(&n)), "db-2");
        assert_eq!(unique_name("web", |n| taken.contains(&n)), "web");
        let long = "a".repeat(63);
        let n = unique_name(&long, |n| n == long);
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("-1"));
    }

    proptest! {
        #[test]
        fn sanitized_names_are_always_valid_labels(s in ".{0,120}") {
            let l = sanitize_hostname(&s);
            prop_assert!(!l.is_empty() && l.len() <= 63);
            prop_assert!(l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            prop_assert!(!l.starts_with('-') && !l.ends_with('-'));
        }

        #[test]
        fn allocated_addresses_are_in_range_and_not_reserved(start in 0u32..CGNAT_SIZE) {
            let o = next_free(start, |_| false).unwrap();
            let ip = ipv4_at(o);
            let net: ipnet::Ipv4Net = "100.64.0.0/10".parse().unwrap();
            prop_assert!(net.contains(&ip));
            prop_assert_ne!(ip, RESOLVER_V4);
        }
    }
}
