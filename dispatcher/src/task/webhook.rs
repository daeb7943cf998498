//! Webhooks as the task domain sees them: where a task's notifications go and which
//! events it wants ([`WebhookSpec`]), which state change is which event
//! ([`event_of`]), and the rules a destination must pass before anything is sent to it
//! ([`check_url`], [`refused_address`], [`Destinations`]). Pure: no I/O, no DNS (the
//! delivery worker, [`crate::webhooks`], resolves names and applies the same rules to
//! the addresses it gets).
//!
//! Invariants:
//! - a stored webhook URL is `http` or `https`, at most [`MAX_URL_BYTES`] long, with a
//!   host and without user information (credentials in a URL end up in logs);
//! - an address is refused unless it is a public unicast address: loopback, private
//!   (RFC 1918, ULA), link-local (cloud metadata services live there), CGNAT,
//!   unspecified, multicast, broadcast, documentation and the IPv4-mapped or
//!   -compatible IPv6 forms of these are refused, unless the operator allows the host
//!   by name ([`Destinations::allowed_hosts`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::TaskState;

/// The longest webhook URL accepted.
pub const MAX_URL_BYTES: usize = 2048;

/// The webhook URLs the OpenAPI document states (with `maxLength` [`MAX_URL_BYTES`]):
/// `http` or `https`, a host name (its last label starting with a letter, as a WHATWG URL
/// reader otherwise takes it for an IPv4 address; no label starting `xn--`, whose
/// punycode may not decode), a port, then any printable text. [`check_url`] takes every
/// such URL when the operator lists no hosts; it also takes public IP addresses and valid
/// punycode, which the pattern leaves out (a regular expression of either would be
/// unreadable). Spelt without look-ahead, which not every reader of the document has.
#[must_use]
pub fn url_pattern() -> String {
    const REST: &str = "[-a-zA-Z0-9]*";
    // x, xn, xn-, or more that is not xn--.
    let x_label =
        format!("[xX]([-a-mo-zA-MO-Z0-9]{REST}|[nN]([a-zA-Z0-9]{REST}|-([a-zA-Z0-9]{REST})?)?)?");
    let label = format!("([-a-wyzA-WYZ0-9]{REST}|{x_label})");
    let last_label = format!("([a-wyzA-WYZ]{REST}|{x_label})");
    let port = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})";
    format!("^[Hh][Tt][Tt][Pp][Ss]?://({label}\\.)*{last_label}(:{port})?([/?#][!-~]*)?$")
}

/// Which state changes a webhook is told of.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// The task ended: `task.succeeded`, `task.failed`, `task.cancelled`,
    /// `task.timed_out`, `task.expired`.
    Terminal,
    /// Its command started running: `task.started`.
    Started,
    /// An attempt failed and another one waits in the queue: `task.retrying`.
    Retrying,
}

impl WebhookEvent {
    pub const ALL: [Self; 3] = [Self::Terminal, Self::Started, Self::Retrying];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Terminal => "terminal",
            Self::Started => "started",
            Self::Retrying => "retrying",
        }
    }
}

impl std::str::FromStr for WebhookEvent {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|event| event.as_str() == text)
            .ok_or_else(|| {
                format!("unknown event '{text}': expected terminal, started or retrying")
            })
    }
}

/// Where a task's notifications go, and which events it wants. Holds no secret: the
/// tenant's signing secret is kept apart ([`crate::store`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookSpec {
    /// `http` or `https` URL the deliveries are POSTed to.
    pub url: String,
    /// The events sent (default `["terminal"]`).
    pub events: Vec<WebhookEvent>,
}

impl WebhookSpec {
    /// Whether `event` is sent to this webhook.
    #[must_use]
    pub fn wants(&self, event: WebhookEvent) -> bool {
        self.events.contains(&event)
    }
}

/// A webhook as a submission writes it; [`check_webhook`] makes it a [`WebhookSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct WebhookInput {
    /// `http` or `https`, at most 2048 bytes, no user information.
    pub url: String,
    /// Any of `terminal` (the default), `started`, `retrying`.
    pub events: Option<Vec<String>>,
}

/// The event a state change from `from` to `to` is, with its payload type
/// (`task.succeeded`…); `None` for changes no webhook is told of.
#[must_use]
pub fn event_of(from: TaskState, to: TaskState) -> Option<(WebhookEvent, &'static str)> {
    let terminal = |name| Some((WebhookEvent::Terminal, name));
    match to {
        TaskState::Succeeded => terminal("task.succeeded"),
        TaskState::Failed => terminal("task.failed"),
        TaskState::Cancelled => terminal("task.cancelled"),
        TaskState::TimedOut => terminal("task.timed_out"),
        TaskState::Expired => terminal("task.expired"),
        TaskState::Running if from != TaskState::Running => {
            Some((WebhookEvent::Started, "task.started"))
        }
        // Back to the queue from an attempt in progress: a retry or a GPU-class fallback.
        TaskState::Queued if from != TaskState::Queued => {
            Some((WebhookEvent::Retrying, "task.retrying"))
        }
        _ => None,
    }
}

/// Which hosts deliveries may go to, as the operator configured it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    /// `Some`: only these hosts (lowercase names or IP literals), at whatever address they
    /// resolve to, private ones included; `None`: any host whose address is public.
    pub allowed_hosts: Option<Vec<String>>,
}

impl Destinations {
    /// Whether `host` (lowercase, IPv6 without brackets) is allowed by name. Always
    /// `true` without an allow-list.
    #[must_use]
    pub fn host_listed(&self, host: &str) -> bool {
        self.allowed_hosts.as_ref().is_none_or(|hosts| {
            hosts
                .iter()
                .any(|allowed| allowed.trim_start_matches('[').trim_end_matches(']') == host)
        })
    }

    /// Whether an address `host` resolved to may be connected to: any address of a
    /// listed host with an allow-list, else only public ones. The refusal says why.
    pub fn check_address(&self, ip: IpAddr) -> Result<(), String> {
        if self.allowed_hosts.is_some() {
            return Ok(());
        }
        match refused_address(ip) {
            Some(why) => Err(format!("address {ip} is {why}")),
            None => Ok(()),
        }
    }
}

/// Why a webhook destination is refused before any DNS lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlRefusal(pub String);

/// Checks a webhook URL as far as can be done without DNS: scheme, length, user
/// information, host ([`check_url_form`]), the allow-list, and an IP-literal host's
/// address. Returns the host (lowercase; IPv6 without brackets).
pub fn check_url(text: &str, destinations: &Destinations) -> Result<String, UrlRefusal> {
    let host = check_url_form(text)?;
    if !destinations.host_listed(&host) {
        return Err(UrlRefusal(format!(
            "host '{host}' is not among the operator's allowed webhook hosts"
        )));
    }
    if let Ok(ip) = host.parse::<IpAddr>()
        && let Err(why) = destinations.check_address(ip)
    {
        return Err(UrlRefusal(format!("{why}: refused")));
    }
    Ok(host)
}

/// The rules of a webhook URL that hold whatever the operator allows: `http` or
/// `https`, at most [`MAX_URL_BYTES`], a host, no user information. Returns the host.
pub fn check_url_form(text: &str) -> Result<String, UrlRefusal> {
    let refuse = |why: String| Err(UrlRefusal(why));
    if text.len() > MAX_URL_BYTES {
        return refuse(format!("must be at most {MAX_URL_BYTES} bytes"));
    }
    let url = match url::Url::parse(text) {
        Ok(url) => url,
        Err(error) => return refuse(format!("is not a URL: {error}")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return refuse(format!(
            "scheme '{}' is not allowed: only http and https",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("must not carry user information (user:password@)".to_owned());
    }
    let host = match url.host() {
        Some(url::Host::Domain(name)) if !name.is_empty() => name.to_ascii_lowercase(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return refuse("must name a host".to_owned()),
    };
    Ok(host)
}

/// Checks a submission's webhook: the URL ([`check_url`]) and the events (known, none
/// twice, `terminal` when none are given). The error names the field.
pub fn check_webhook(
    input: WebhookInput,
    destinations: &Destinations,
) -> Result<WebhookSpec, (&'static str, String)> {
    check_url(&input.url, destinations).map_err(|why| ("webhook.url", why.0))?;
    let events = check_events(input.events).map_err(|why| ("webhook.events", why))?;
    Ok(WebhookSpec {
        url: input.url,
        events,
    })
}

/// The events a webhook lists: known ones, none twice, `terminal` when none are given;
/// sorted.
pub fn check_events(names: Option<Vec<String>>) -> Result<Vec<WebhookEvent>, String> {
    let Some(names) = names else {
        return Ok(vec![WebhookEvent::Terminal]);
    };
    if names.is_empty() || names.len() > WebhookEvent::ALL.len() {
        return Err("must list 1 to 3 of terminal, started, retrying".to_owned());
    }
    let mut events = Vec::with_capacity(names.len());
    for name in &names {
        let event = name.parse::<WebhookEvent>()?;
        if events.contains(&event) {
            return Err(format!("'{name}' is listed twice"));
        }
        events.push(event);
    }
    events.sort();
    Ok(events)
}

/// Why `ip` is never a webhook destination (without an allow-list), or `None` for a
/// public unicast address.
#[must_use]
pub fn refused_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            // ::ffff:a.b.c.d and the deprecated ::a.b.c.d reach the IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_v4(v4).map(|_| "an IPv4-mapped address of a refused one");
            }
            refused_v6(v6)
        }
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local (169.254.0.0/16, where cloud metadata services answer)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared address space (CGNAT, 100.64.0.0/10)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_documentation() || a >= 240 || (a == 192 && b == 0 && ip.octets()[2] == 0) {
        Some("reserved")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("reserved for benchmarking (198.18.0.0/15)")
    } else {
        None
    }
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some("unspecified (::)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if first & 0xfe00 == 0xfc00 {
        // fd00:ec2::254, the AWS metadata service over IPv6, is in here.
        Some("unique local (fc00::/7)")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local (fe80::/10)")
    } else if first & 0xff00 == 0xff00 {
        Some("multicast")
    } else if first == 0x2001 && ip.segments()[1] == 0x0db8 {
        Some("reserved for documentation (2001:db8::/32)")
    } else if ip.to_ipv4().is_some() {
        // ::a.b.c.d (IPv4-compatible, deprecated) and the rest of ::/96.
        Some("an IPv4-compatible address")
    } else if first == 0x0064 && ip.segments()[1] == 0xff9b {
        // NAT64 (64:ff9b::/96) reaches any IPv4 address, private ones too.
        Some("a NAT64 address")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{
        Destinations, WebhookEvent, WebhookInput, check_url, check_webhook, event_of,
        refused_address,
    };
    use crate::task::TaskState;

    #[test]
    fn urls_of_the_documented_pattern_are_taken() {
        let pattern = regex::Regex::new(&super::url_pattern()).unwrap();
        let anywhere = Destinations::default();
        let cases = [
            ("https://hooks.example.com/agent-bus?x=1#f", true),
            ("HTTP://Example.COM:65535", true),
            ("http://a", true),
            ("http://1.a:0/", true),
            ("http://-a-.b--c/%zz<>{}", true),
            ("https://xn--bcher-kva.example/", false),
            ("https://a.xn--ab/", false),
            ("https://XN--ab.a/", false),
            ("https://x.xn.xn-.xn-a-.xna/", true),
            ("http://127.0.0.1/", false),
            ("http://1/", false),
            ("http://a.0x1f/", false),
            ("http://a:65536/", false),
            ("http://user@a/", false),
            ("http://a b/", false),
            ("ftp://a/", false),
            ("http://", false),
            ("http://a./", false),
            ("", false),
        ];
        for (url, documented) in cases {
            assert_eq!(pattern.is_match(url), documented, "pattern: {url}");
            if documented {
                assert!(check_url(url, &anywhere).is_ok(), "{url}");
            }
        }
        // Taken although the pattern leaves them out: public addresses, punycode.
        for url in [
            "http://8.8.8.8/",
            "https://[2001:4860::8888]/",
            "https://xn--bcher-kva.example/",
        ] {
            assert!(check_url(url, &anywhere).is_ok(), "{url}");
        }
    }

    #[test]
    fn only_public_unicast_addresses_are_destinations() {
        for refused in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(refused_address(ip).is_some(), "{refused} must be refused");
        }
        for allowed in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = allowed.parse().unwrap();
            assert_eq!(refused_address(ip), None, "{allowed}");
        }
    }

    #[test]
    fn urls_are_checked_before_any_lookup() {
        let open = Destinations::default();
        for (url, why) in [
            ("file:///etc/passwd", "scheme 'file' is not allowed"),
            ("ftp://example.com/x", "scheme 'ftp' is not allowed"),
            ("gopher://example.com/", "scheme 'gopher'"),
            ("https://user:pw@example.com/", "user information"),
            ("http://169.254.169.254/latest", "link-local"),
            ("http://10.1.2.3/", "private"),
            ("http://[::1]/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
            ("not a url", "is not a URL"),
        ] {
            let refusal = check_url(url, &open).unwrap_err().0;
            assert!(refusal.contains(why), "{url}: {refusal}");
        }
        let long = format!("https://example.com/{}", "a".repeat(2100));
        assert!(check_url(&long, &open).unwrap_err().0.contains("2048"));
        assert_eq!(
            check_url("https://Hooks.Example.com:8443/x?y=1", &open).unwrap(),
            "hooks.example.com"
        );
        // A name is resolved (and its addresses checked) only when delivering.
        assert_eq!(
            check_url("http://localhost:9/", &open).unwrap(),
            "localhost"
        );

        let listed = Destinations {
            allowed_hosts: Some(vec!["127.0.0.1".into(), "[::1]".into(), "receiver".into()]),
        };
        assert!(check_url("http://127.0.0.1:8080/hook", &listed).is_ok());
        assert!(check_url("http://[::1]:8080/hook", &listed).is_ok());
        assert!(check_url("http://receiver/hook", &listed).is_ok());
        assert!(
            check_url("https://example.com/", &listed)
                .unwrap_err()
                .0
                .contains("not among the operator's allowed")
        );
    }

    #[test]
    fn events_default_to_terminal_and_are_named_in_refusals() {
        let open = Destinations::default();
        let input = |events: Option<Vec<&str>>| WebhookInput {
            url: "https://example.com/hook".into(),
            events: events.map(|e| e.into_iter().map(String::from).collect()),
        };
        assert_eq!(
            check_webhook(input(None), &open).unwrap().events,
            vec![WebhookEvent::Terminal]
        );
        assert_eq!(
            check_webhook(input(Some(vec!["retrying", "terminal"])), &open)
                .unwrap()
                .events,
            vec![WebhookEvent::Terminal, WebhookEvent::Retrying]
        );
        for bad in [vec![], vec!["finished"], vec!["terminal", "terminal"]] {
            let (field, _) = check_webhook(input(Some(bad.clone())), &open).unwrap_err();
            assert_eq!(field, "webhook.events", "{bad:?}");
        }
        let (field, _) = check_webhook(
            WebhookInput {
                url: "ftp://example.com".into(),
                events: None,
            },
            &open,
        )
        .unwrap_err();
        assert_eq!(field, "webhook.url");
    }

    #[test]
    fn state_changes_map_to_events() {
        use TaskState::{
            Cancelled, Expired, Failed, Launched, Launching, Queued, Running, Succeeded, TimedOut,
        };
        for (from, to, expected) in [
            (
                Running,
                Succeeded,
                Some((WebhookEvent::Terminal, "task.succeeded")),
            ),
            (
                Running,
                Failed,
                Some((WebhookEvent::Terminal, "task.failed")),
            ),
            (
                Queued,
                Cancelled,
                Some((WebhookEvent::Terminal, "task.cancelled")),
            ),
            (
                Running,
                TimedOut,
                Some((WebhookEvent::Terminal, "task.timed_out")),
            ),
            (
                Queued,
                Expired,
                Some((WebhookEvent::Terminal, "task.expired")),
            ),
            (
                Launched,
                Running,
                Some((WebhookEvent::Started, "task.started")),
            ),
            (
                Running,
                Queued,
                Some((WebhookEvent::Retrying, "task.retrying")),
            ),
            (Queued, Launching, None),
            (Launching, Launched, None),
        ] {
            assert_eq!(event_of(from, to), expected, "{from} -> {to}");
        }
    }
}
