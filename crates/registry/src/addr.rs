//! Registry addresses: `etcd://HOST:PORT[,HOST:PORT…]`.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

/// Why a registry address was refused.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The address does not start with `etcd://`.
    #[error("registry address {0:?} must start with etcd:// (etcd://HOST:PORT[,HOST:PORT...])")]
    Scheme(String),
    /// No member listed.
    #[error("registry address {0:?} names no etcd member (etcd://HOST:PORT[,HOST:PORT...])")]
    Empty(String),
    /// One member is not `HOST:PORT`.
    #[error("registry address {addr:?}: member {member:?} is not HOST:PORT ({reason})")]
    Member {
        /// The whole address.
        addr: String,
        /// The member in question.
        member: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// One etcd member's client endpoint: a host name or IP literal and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    /// The host part (an IPv6 literal without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Resolves the endpoint to socket addresses.
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        Ok((self.host.as_str(), self.port).to_socket_addrs()?.collect())
    }

    fn parse(addr: &str, member: &str) -> Result<Self, AddrError> {
        let bad = |reason| AddrError::Member {
            addr: addr.to_string(),
            member: member.to_string(),
            reason,
        };
        let (host, port) = if let Some(rest) = member.strip_prefix('[') {
            let (host, rest) = rest.split_once(']').ok_or(bad("unclosed '['"))?;
            let port = rest.strip_prefix(':').ok_or(bad("no port"))?;
            (host, port)
        } else {
            member.rsplit_once(':').ok_or(bad("no port"))?
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        if host.contains(['/', '@', '?', '#', ' '])
            || (host.contains(':') && !member.starts_with('['))
        {
            return Err(bad("not a host name or IP address"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad("port is not a number 1-65535"))?;
        if port == 0 {
            return Err(bad("port is not a number 1-65535"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The members of an etcd cluster, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryAddr {
    members: Vec<Endpoint>,
}

impl RegistryAddr {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…]`.
    pub fn parse(s: &str) -> Result<Self, AddrError> {
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| AddrError::Scheme(s.to_string()))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.trim().is_empty() {
            return Err(AddrError::Empty(s.to_string()));
        }
        let members = rest
            .split(',')
            .map(|m| Endpoint::parse(s, m.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { members })
    }

    /// The members, in the order given.
    pub fn members(&self) -> &[Endpoint] {
        &self.members
    }
}

impl fmt::Display for RegistryAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("etcd://")?;
        for (i, m) in self.members.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{m}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for RegistryAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_parsed_in_order() {
        let a = RegistryAddr::parse("etcd://127.0.0.1:2379,localhost:2380,[::1]:2381").unwrap();
        let m: Vec<String> = a.members().iter().map(|e| e.to_string()).collect();
        assert_eq!(m, ["127.0.0.1:2379", "localhost:2380", "[::1]:2381"]);
        assert_eq!(a.members()[2].host(), "::1");
        assert_eq!(
            a.to_string(),
            "etcd://127.0.0.1:2379,localhost:2380,[::1]:2381"
        );
    }

    #[test]
    fn malformed_addresses_are_refused_with_the_reason() {
        let cases = [
            ("http://127.0.0.1:2379", "must start with etcd://"),
            ("127.0.0.1:2379", "must start with etcd://"),
            ("etcd://", "names no etcd member"),
            ("etcd://127.0.0.1", "no port"),
            ("etcd://127.0.0.1:", "port is not a number"),
            ("etcd://127.0.0.1:0", "port is not a number"),
            ("etcd://127.0.0.1:99999", "port is not a number"),
            ("etcd://:2379", "empty host"),
            ("etcd://a:1,,b:2", "no port"),
            ("etcd://::1:2379", "not a host name"),
            ("etcd://[::1:2379", "unclosed"),
            ("etcd://a/b:1", "not a host name"),
        ];
        for (input, want) in cases {
            let e = RegistryAddr::parse(input).unwrap_err().to_string();
            assert!(e.contains(want), "{input:?}: {e}");
        }
    }
}
