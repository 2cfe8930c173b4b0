//! Where `tasker.http` may connect: the outbound policy (docs/security.md, "Outbound
//! HTTP").
//!
//! A template author chooses the URL, so without a policy any `tasks:write` holder
//! could make a worker call the addresses only it reaches (cloud metadata, the broker's
//! management API, internal services) and read the answer back as the step's results.
//!
//! - Only `http` and `https`.
//! - Any public address; no loopback, private, link-local, shared (CGNAT), multicast,
//!   reserved or unspecified one ([`is_internal`]) unless `TASKER_HTTP_ALLOW` lists it
//!   (comma separated: `payments.internal`, `*.corp.example`, `127.0.0.1`,
//!   `10.1.0.0/16`).
//! - Checked on the addresses a name resolves to, at connect time, for the first request
//!   and every redirect alike, so neither a redirect nor a DNS answer that changes
//!   between check and use gets past it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The setting that lists the internal destinations allowed.
pub const ALLOW_VAR: &str = "TASKER_HTTP_ALLOW";

/// One entry of `TASKER_HTTP_ALLOW`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// A host name, matched exactly (case-insensitive).
    Host(String),
    /// `*.example.com`: any host name ending in `.example.com`.
    Suffix(String),
    /// An address or network (`10.1.0.0/16`, `::1`).
    Net(IpNet),
}

impl std::str::FromStr for AllowEntry {
    type Err = String;

    fn from_str(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        if let Ok(net) = entry.parse::<IpNet>() {
            return Ok(AllowEntry::Net(net));
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Ok(AllowEntry::Net(IpNet::from(ip)));
        }
        let (suffix, host) = match entry.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "`{entry}` is not a host name, `*.` suffix, IP address or network (CIDR)"
            ));
        }
        let host = host.to_ascii_lowercase();
        Ok(if suffix {
            AllowEntry::Suffix(format!(".{host}"))
        } else {
            AllowEntry::Host(host)
        })
    }
}

/// Where `tasker.http` may connect.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    /// Internal destinations allowed all the same.
    allow: Vec<AllowEntry>,
}

/// Why a destination is refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

impl OutboundPolicy {
    /// A policy allowing every public address and the internal ones `allow` lists.
    pub fn new(allow: Vec<AllowEntry>) -> Self {
        OutboundPolicy { allow }
    }

    /// The policy `TASKER_HTTP_ALLOW` describes.
    ///
    /// # Errors
    ///
    /// Names every entry that cannot be read.
    pub fn from_env() -> Result<Self, String> {
        let Ok(value) = std::env::var(ALLOW_VAR) else {
            return Ok(Self::default());
        };
        let mut allow = Vec::new();
        let mut problems = Vec::new();
        for entry in value.split(',').filter(|e| !e.trim().is_empty()) {
            match entry.parse() {
                Ok(entry) => allow.push(entry),
                Err(problem) => problems.push(problem),
            }
        }
        if problems.is_empty() {
            Ok(Self::new(allow))
        } else {
            Err(format!("{ALLOW_VAR}: {}", problems.join("; ")))
        }
    }

    /// Whether a URL may be requested before anything is resolved: its scheme, and its
    /// host when the host is an address.
    ///
    /// # Errors
    ///
    /// Says why the URL is refused.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Denied> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Denied(format!(
                "the scheme `{}` is not allowed (only http and https)",
                url.scheme()
            )));
        }
        match url.host() {
            None => Err(Denied("the URL has no host".to_owned())),
            Some(url::Host::Ipv4(ip)) => self.check_address(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_address(&ip.to_string(), IpAddr::V6(ip)),
            // A name: its addresses are checked when it is resolved.
            Some(url::Host::Domain(_)) => Ok(()),
        }
    }

    /// Whether `host` (as written in the URL) may be reached at `ip`.
    fn check_address(&self, host: &str, ip: IpAddr) -> Result<(), Denied> {
        if !is_internal(ip) {
            return Ok(());
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let listed = self.allow.iter().any(|entry| match entry {
            AllowEntry::Host(name) => *name == host,
            AllowEntry::Suffix(suffix) => host.ends_with(suffix.as_str()),
            AllowEntry::Net(net) => net.contains(&canonical(ip)),
        });
        if listed {
            Ok(())
        } else {
            Err(Denied(format!(
                "{host} is an internal address ({ip}); list it in {ALLOW_VAR} to allow it"
            )))
        }
    }
}

/// The IPv4 address an IPv6 one reaches: IPv4-mapped (`::ffff:127.0.0.1`), IPv4-compatible
/// (`::127.0.0.1`), NAT64's well-known prefix (`64:ff9b::/96`, where the network has a
/// NAT64 gateway) and 6to4 (`2002:AABB:CCDD::/48`). So each is judged as the IPv4 address
/// it stands for.
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let low = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // `::` and `::1` are IPv6's own unspecified and loopback addresses.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => ip,
        [0, 0, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => IpAddr::V4(low),
        [0x2002, high, low16, ..] => IpAddr::V4(std::net::Ipv4Addr::new(
            (high >> 8) as u8,
            high as u8,
            (low16 >> 8) as u8,
            low16 as u8,
        )),
        _ => ip,
    }
}

/// Addresses that are not on the public internet: loopback, private (RFC 1918, IPv6
/// unique local), link-local (cloud metadata lives at 169.254.169.254), shared address
/// space (100.64.0.0/10), benchmarking (198.18.0.0/15), IETF protocol assignments
/// (192.0.0.0/24), multicast, reserved (240.0.0.0/4), broadcast and unspecified.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || (a == 192 && b == 0 && c == 0)
                || a >= 240
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            let second = v6.segments()[1];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                // NAT64's local-use prefix (64:ff9b:1::/48): the IPv4 it reaches is
                // wherever the operator's translator puts it.
                || (first == 0x64 && second == 0xff9b && v6.segments()[2] == 1)
        }
    }
}

/// The resolver of `tasker.http`'s client: the system's, keeping only the addresses the
/// policy allows for the name asked for. Every connection (redirects too) goes through
/// it, so the check is made on the address actually used.
pub(crate) struct PolicyResolver {
    pub(crate) policy: Arc<OutboundPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addresses
                .into_iter()
                .filter(|address| match policy.check_address(&host, address.ip()) {
                    Ok(()) => true,
                    Err(denied) => {
                        refused.get_or_insert(denied);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let denied =
                    refused.unwrap_or_else(|| Denied(format!("{host} resolves to no address")));
                return Err(Box::new(denied) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &str) -> OutboundPolicy {
        OutboundPolicy::new(
            entries
                .split(',')
                .filter(|e| !e.is_empty())
                .map(|e| e.parse().unwrap())
                .collect(),
        )
    }

    fn url(text: &str) -> reqwest::Url {
        text.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_refused_by_default() {
        let open = OutboundPolicy::default();
        for internal in [
            "127.0.0.1",
            "10.2.3.4",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            // IPv4-compatible, NAT64 (well-known and local-use) and 6to4 forms.
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b::169.254.169.254",
            "64:ff9b:1::8.8.8.8",
            "2002:a00:1::1",
            "2002:7f00:1::",
        ] {
            let ip: IpAddr = internal.parse().unwrap();
            assert!(is_internal(ip), "{internal}");
            assert!(open.check_address(internal, ip).is_err(), "{internal}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert!(!is_internal(ip), "{public}");
            assert!(open.check_address(public, ip).is_ok(), "{public}");
        }
        let denied = open
            .check_url(&url("http://169.254.169.254/latest/meta-data"))
            .unwrap_err();
        assert!(denied.0.contains("TASKER_HTTP_ALLOW"), "{denied}");
        assert!(open.check_url(&url("http://[::1]:8080/")).is_err());
        assert!(open.check_url(&url("https://example.com/")).is_ok());
    }

    #[test]
    fn only_http_and_https() {
        let open = OutboundPolicy::default();
        for refused in [
            "file:///etc/passwd",
            "ftp://example.com/",
            "gopher://example.com/",
        ] {
            let denied = open.check_url(&url(refused)).unwrap_err();
            assert!(
                denied.0.contains("only http and https"),
                "{refused}: {denied}"
            );
        }
    }

    #[test]
    fn the_allow_list_admits_the_internal_hosts_and_networks_it_names() {
        let listed = policy("payments.internal,*.corp.example,10.1.0.0/16,127.0.0.1");
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(
            listed
                .check_address("Payments.Internal.", ip("10.9.9.9"))
                .is_ok()
        );
        assert!(
            listed
                .check_address("db.corp.example", ip("10.200.0.1"))
                .is_ok()
        );
        assert!(
            listed
                .check_address("corp.example", ip("10.200.0.1"))
                .is_err()
        );
        assert!(listed.check_address("x.test", ip("10.1.2.3")).is_ok());
        assert!(listed.check_address("x.test", ip("10.2.0.1")).is_err());
        assert!(listed.check_url(&url("http://127.0.0.1:9000/")).is_ok());
        assert!(listed.check_url(&url("http://127.0.0.2:9000/")).is_err());
        // Public addresses stay allowed, listed or not.
        assert!(
            listed
                .check_address("other.com", ip("93.184.216.34"))
                .is_ok()
        );
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["http://x", "a..b", "10.0.0.0/33", "*.", "exa mple.com"] {
            let error = bad.parse::<AllowEntry>().unwrap_err();
            assert!(error.contains(bad.trim()), "{bad}: {error}");
        }
    }
}
