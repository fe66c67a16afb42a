//! The downloader: reqwest on tokio with the limits a crawler of other people's servers needs.
//!
//! Invariants:
//! - At most [`FetchConfig::concurrency`] downloads run at once, and at most
//!   [`FetchConfig::per_host`] against one host; connections are pooled and reused.
//! - Every attempt has a connect timeout and a total deadline covering headers and body, so a
//!   server that drips its body slowly loses its slot at the deadline.
//! - Only transient failures are retried (connect errors, timeouts, resets, HTTP 429 and 5xx),
//!   with exponential backoff and jitter, or after the server's `Retry-After`; other 4xx never.
//! - Redirects are followed by hand, at most [`FetchConfig::max_redirects`], and every hop passes
//!   the same checks as the first URL.
//! - Unless a CIDR of [`FetchConfig::allow_cidrs`] covers it, a URL whose host is, or resolves to, a
//!   loopback, private, link-local (169.254.169.254 included), shared, multicast, broadcast,
//!   documentation or unspecified address is refused, and so is any scheme but http and https. The
//!   check runs in the DNS resolver the client uses, so the address checked is the address
//!   connected to.
//! - `X-Robots-Tag` (noai, noimageai, noindex, noimageindex; for all agents or for
//!   [`FetchConfig::robots_token`]) is honoured by default and checked on the headers before the
//!   body is read.
//! - A body larger than [`FetchConfig::max_body_bytes`] is abandoned as soon as it is known to be
//!   (Content-Length, or while streaming).
//! - Bodies held in memory, downloading or waiting to be decoded, never total more than
//!   [`FetchConfig::max_inflight_bytes`]: a body reserves its bytes before reading them and keeps
//!   them until its [`Fetched`] is dropped. A download waiting for budget waits inside its deadline.
//! - Credentials in a URL (`user:pass@`) are removed before the request unless
//!   [`FetchConfig::allow_url_credentials`]; they never appear in an error message or in
//!   [`Fetched::final_url`].
//! - Deterministic failures (4xx but 429, malformed or oversized response heads, refusals) are
//!   never retried.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use rand::Rng;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use tokio::sync::Semaphore;
use url::Url;

/// Downloader settings. Defaults suit a crawl of LAION-style lists on one machine.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Downloads in flight at once (default 64).
    pub concurrency: usize,
    /// Downloads in flight against one host (default 8).
    pub per_host: usize,
    /// TCP/TLS connect timeout (default 10 s).
    pub connect_timeout: Duration,
    /// Deadline of one attempt, headers and body included (default 30 s).
    pub deadline: Duration,
    /// Retries after the first attempt, for transient failures only (default 2).
    pub max_retries: u32,
    /// First backoff; doubles each retry, ±50 % jitter (default 500 ms).
    pub backoff: Duration,
    /// Longest wait before a retry; a longer `Retry-After` fails the download instead (default 30 s).
    pub max_backoff: Duration,
    /// Redirect hops followed (default 5).
    pub max_redirects: usize,
    /// Largest body accepted (default 32 MiB).
    pub max_body_bytes: u64,
    /// User-Agent header.
    pub user_agent: String,
    /// Honour `X-Robots-Tag` noai/noimageai/noindex/noimageindex (default true).
    pub respect_robots: bool,
    /// Agent token matched by agent-specific `X-Robots-Tag` values (default "llamagen").
    pub robots_token: String,
    /// Address ranges allowed even though private, loopback, … (tests, on-premise sources).
    pub allow_cidrs: Vec<IpNet>,
    /// Send `user:pass@` credentials found in URLs as Basic auth (default false: stripped).
    pub allow_url_credentials: bool,
    /// Bytes of bodies held in memory at once, over all downloads (default 256 MiB; raised to
    /// `max_body_bytes` if below it, so that any accepted body can complete).
    pub max_inflight_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            concurrency: 64,
            per_host: 8,
            connect_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
            max_retries: 2,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_redirects: 5,
            max_body_bytes: 32 << 20,
            user_agent: format!(
                "llamagen/{} (+https://github.com/llamagen-rs/llamagen; image-text dataset builder)",
                env!("CARGO_PKG_VERSION")
            ),
            respect_robots: true,
            robots_token: "llamagen".into(),
            allow_cidrs: Vec::new(),
            allow_url_credentials: false,
            max_inflight_bytes: 256 << 20,
        }
    }
}

/// A successful download.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub body: Bytes,
    pub http_status: u16,
    pub content_type: Option<String>,
    /// URL after redirects.
    pub final_url: String,
    /// Attempts made (1 = no retry).
    pub attempts: u32,
    /// The body's share of the in-flight byte budget, returned when this is dropped.
    _budget: Option<Arc<Reservation>>,
}

/// Bytes reserved from a [`Fetcher`]'s in-flight budget for one body.
#[derive(Debug)]
struct Reservation {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    bytes: u64,
    held: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.held
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a download did not produce a body. `kind` is the stable `error_kind` stored in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct FetchFailure {
    pub kind: &'static str,
    pub message: String,
    pub http_status: Option<u16>,
    /// Whether the failure is a deliberate refusal (robots header): the sample is dropped, not failed.
    pub is_refusal: bool,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl FetchFailure {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        FetchFailure {
            kind,
            message: message.into(),
            http_status: None,
            is_refusal: false,
            retryable: false,
            retry_after: None,
        }
    }
    fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }
}

/// Whether an address is publicly routable (and so fetchable without an allow-list).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared address space
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            // Forms that carry an IPv4 address are as public as that address: mapped
            // (::ffff:a.b.c.d), compatible (::a.b.c.d), translated (::ffff:0:a.b.c.d), NAT64
            // (64:ff9b::a.b.c.d), 6to4 (2002:AABB:CCDD::) and Teredo (2001:0::, client address
            // inverted in the last 32 bits).
            if let Some(v4) = embedded_ipv4(v6) {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // Global unicast is 2000::/3; everything else (loopback, unspecified, unique and link
            // local, site local, multicast, discard-only 100::/64) is not fetched.
            (s[0] & 0xe000) == 0x2000
                && !((s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                    || (s[0] & 0xfff0) == 0x3ff0 // 3fff::/20 documentation
                    || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // 2001:2::/48 benchmarking
                    || (s[0] == 0x2001 && (s[1] & 0xffe0) == 0x0020) // 2001:20::/28 ORCHIDv2
                    || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0010) // 2001:10::/28 ORCHID
                    || (s[0] == 0x2001 && s[1] < 0x0200)) // 2001::/23 IETF protocol assignments
        }
    }
}

/// The IPv4 address an IPv6 address carries, for the forms that route to one.
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| {
        std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    match s {
        // ::a.b.c.d (IPv4-compatible; :: and ::1 are not)
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(v4(hi, lo)),
        // ::ffff:0:a.b.c.d (IPv4-translated)
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(v4(hi, lo)),
        // 64:ff9b::a.b.c.d (NAT64 well-known prefix)
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        // 64:ff9b:1::/48 (local-use NAT64): the IPv4 address may be anywhere; treat as private.
        [0x64, 0xff9b, 1, ..] => Some(std::net::Ipv4Addr::new(10, 0, 0, 0)),
        // 2002:AABB:CCDD::/48 (6to4)
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        // 2001:0::/32 (Teredo): the client's address, inverted, in the last 32 bits
        [0x2001, 0, _, _, _, _, hi, lo] => Some(v4(!hi, !lo)),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct Guard {
    allow: Vec<IpNet>,
}

impl Guard {
    fn allowed(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// The client's DNS resolver: resolves, then keeps only addresses the guard allows.
struct GuardedResolver(Guard);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?
                .collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| guard.allowed(a.ip()))
                .collect();
            if allowed.is_empty() {
                let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                return Err(Box::new(Refused(format!(
                    "{host} resolves only to non-public addresses ({})",
                    shown.join(", ")
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[derive(Debug)]
struct Refused(String);
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused: {}", self.0)
    }
}
impl std::error::Error for Refused {}

/// The downloader. Cheap to clone; clones share limits and connections.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    cfg: Arc<FetchConfig>,
    guard: Guard,
    global: Arc<Semaphore>,
    hosts: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    /// The in-flight byte budget (one permit per byte), bytes held now and their high-water mark.
    budget: Arc<Semaphore>,
    held: Arc<std::sync::atomic::AtomicU64>,
    peak: Arc<std::sync::atomic::AtomicU64>,
}

impl Fetcher {
    pub fn new(cfg: FetchConfig) -> Result<Fetcher, reqwest::Error> {
        let guard = Guard {
            allow: cfg.allow_cidrs.clone(),
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.connect_timeout)
            .user_agent(cfg.user_agent.clone())
            .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
            .pool_max_idle_per_host(cfg.per_host)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        let budget = cfg
            .max_inflight_bytes
            .max(cfg.max_body_bytes)
            .min(Semaphore::MAX_PERMITS as u64) as usize;
        Ok(Fetcher {
            client,
            global: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            hosts: Default::default(),
            budget: Arc::new(Semaphore::new(budget)),
            held: Default::default(),
            peak: Default::default(),
            guard,
            cfg: Arc::new(cfg),
        })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.cfg
    }

    /// The most body bytes held in memory at once so far (never above the in-flight budget).
    pub fn peak_inflight_bytes(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reserves `n` more bytes of the budget for the body `r` is reading.
    async fn reserve(&self, r: &mut Reservation, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if n == 0 {
            return;
        }
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(n.min(u32::MAX as u64) as u32)
            .await
            .expect("semaphore never closed");
        let now = self.held.fetch_add(n, Relaxed) + n;
        self.peak.fetch_max(now, Relaxed);
        r.bytes += n;
        match &mut r.permit {
            Some(p) => p.merge(permit),
            None => r.permit = Some(permit),
        }
    }

    fn host_slot(&self, host: &str) -> Arc<Semaphore> {
        let mut hosts = self.hosts.lock().expect("host map poisoned");
        hosts
            .entry(host.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.cfg.per_host.max(1))))
            .clone()
    }

    /// Checks scheme and literal-IP hosts of one URL (hostnames are checked when resolved).
    fn check_url(&self, url: &Url) -> Result<(), FetchFailure> {
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(FetchFailure::new(
                    "unsupported_scheme",
                    format!("scheme {other:?} refused (only http and https)"),
                ));
            }
        }
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => None,
            None => return Err(FetchFailure::new("invalid_url", "URL has no host")),
        };
        if let Some(ip) = ip {
            if !self.guard.allowed(ip) {
                return Err(FetchFailure::new(
                    "ssrf_refused",
                    format!("{ip} is not a public address"),
                ));
            }
        }
        Ok(())
    }

    /// Downloads one URL with retries; waits for a global and a per-host slot first.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, FetchFailure> {
        let mut parsed =
            Url::parse(url.trim()).map_err(|e| FetchFailure::new("invalid_url", e.to_string()))?;
        self.check_url(&parsed)?;
        let secrets = url_secrets(&parsed);
        if !self.cfg.allow_url_credentials {
            strip_url(&mut parsed);
        }
        self.fetch_parsed(parsed).await.map_err(|mut e| {
            for s in &secrets {
                e.message = e.message.replace(s.as_str(), "");
            }
            e
        })
    }

    async fn fetch_parsed(&self, parsed: Url) -> Result<Fetched, FetchFailure> {
        let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
        let slot = self.host_slot(&host);
        let _host_permit = slot.acquire().await.expect("semaphore never closed");
        let _permit = self.global.acquire().await.expect("semaphore never closed");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result =
                match tokio::time::timeout(self.cfg.deadline, self.attempt(parsed.clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(FetchFailure::new(
                        "timeout",
                        format!("no complete response within {:?}", self.cfg.deadline),
                    )
                    .retryable()),
                };
            match result {
                Ok(mut f) => {
                    f.attempts = attempt;
                    return Ok(f);
                }
                Err(e) if e.retryable && attempt <= self.cfg.max_retries => {
                    let exp = self.cfg.backoff.saturating_mul(1 << (attempt - 1).min(16));
                    let jitter = rand::rng().random_range(0.5..1.5);
                    let wait = match e.retry_after {
                        Some(ra) if ra > self.cfg.max_backoff => {
                            return Err(FetchFailure {
                                message: format!(
                                    "{} (Retry-After {:?} is too long)",
                                    e.message, ra
                                ),
                                ..e
                            });
                        }
                        Some(ra) => ra,
                        None => exp.mul_f64(jitter).min(self.cfg.max_backoff),
                    };
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    return Err(if attempt > 1 {
                        FetchFailure {
                            message: format!("{} (after {attempt} attempts)", e.message),
                            ..e
                        }
                    } else {
                        e
                    });
                }
            }
        }
    }

    async fn attempt(&self, mut url: Url) -> Result<Fetched, FetchFailure> {
        let mut hops = 0;
        loop {
            self.check_url(&url)?;
            if !self.cfg.allow_url_credentials {
                strip_url(&mut url);
            }
            let resp = self
                .client
                .get(url.clone())
                .send()
                .await
                .map_err(classify)?;
            let status = resp.status();
            if status.is_redirection() {
                let Some(loc) = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()) else {
                    return Err(http_failure(
                        status.as_u16(),
                        None,
                        "redirect without Location",
                    ));
                };
                hops += 1;
                if hops > self.cfg.max_redirects {
                    return Err(FetchFailure::new(
                        "too_many_redirects",
                        format!("more than {} redirects", self.cfg.max_redirects),
                    ));
                }
                url = url.join(loc).map_err(|e| {
                    FetchFailure::new("invalid_redirect", format!("Location {loc:?}: {e}"))
                })?;
                continue;
            }
            if !status.is_success() {
                let retry_after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                return Err(http_failure(
                    status.as_u16(),
                    retry_after,
                    status.canonical_reason().unwrap_or(""),
                ));
            }
            if self.cfg.respect_robots {
                for v in resp.headers().get_all("x-robots-tag") {
                    if let Ok(v) = v.to_str() {
                        if robots_disallow(v, &self.cfg.robots_token) {
                            return Err(FetchFailure {
                                is_refusal: true,
                                http_status: Some(status.as_u16()),
                                ..FetchFailure::new("robots_noai", format!("X-Robots-Tag: {v}"))
                            });
                        }
                    }
                }
            }
            let len = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(len) = len {
                if len > self.cfg.max_body_bytes {
                    return Err(FetchFailure::new(
                        "too_large",
                        format!(
                            "Content-Length {len} exceeds {} bytes",
                            self.cfg.max_body_bytes
                        ),
                    ));
                }
            }
            let content_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            // The body's memory comes out of the in-flight budget before it is allocated: all of
            // it when the length is announced, else in steps of at least 64 KiB as it arrives.
            let mut reservation = Reservation {
                permit: None,
                bytes: 0,
                held: self.held.clone(),
            };
            let initial = len.unwrap_or(64 << 10).min(self.cfg.max_body_bytes);
            self.reserve(&mut reservation, initial).await;
            let mut body = BytesMut::with_capacity(initial as usize);
            let mut resp = resp;
            while let Some(chunk) = resp.chunk().await.map_err(classify)? {
                let need = body.len() as u64 + chunk.len() as u64;
                if need > self.cfg.max_body_bytes {
                    return Err(FetchFailure::new(
                        "too_large",
                        format!("body exceeds {} bytes", self.cfg.max_body_bytes),
                    ));
                }
                if need > reservation.bytes {
                    let step = (need - reservation.bytes)
                        .max(64 << 10)
                        .min(self.cfg.max_body_bytes - reservation.bytes);
                    self.reserve(&mut reservation, step).await;
                }
                body.extend_from_slice(&chunk);
            }
            if let Some(len) = len {
                if (body.len() as u64) < len {
                    return Err(FetchFailure::new(
                        "truncated",
                        format!("body ended after {} of {len} bytes", body.len()),
                    )
                    .retryable());
                }
            }
            return Ok(Fetched {
                body: body.freeze(),
                http_status: status.as_u16(),
                content_type,
                final_url: llamagen_catalog::source::strip_url_credentials(url.as_str())
                    .into_owned(),
                attempts: 1,
                _budget: Some(Arc::new(reservation)),
            });
        }
    }
}

/// The forms in which a URL's credentials can appear in a message (`user:pass@`, `user@`, `:pass@`).
fn url_secrets(url: &Url) -> Vec<String> {
    let (user, pass) = (url.username(), url.password());
    let mut out = Vec::new();
    if let Some(p) = pass {
        out.push(format!("{user}:{p}@"));
        out.push(format!(":{p}@"));
    }
    if !user.is_empty() {
        out.push(format!("{user}@"));
    }
    out
}

fn strip_url(url: &mut Url) {
    if !url.username().is_empty() || url.password().is_some() {
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
}

fn http_failure(status: u16, retry_after: Option<Duration>, reason: &str) -> FetchFailure {
    let transient = status == 429 || (500..600).contains(&status);
    let kind = match status {
        404 => "http_404",
        403 => "http_403",
        410 => "http_410",
        429 => "http_429",
        400..=499 => "http_4xx",
        500..=599 => "http_5xx",
        _ => "http_other",
    };
    FetchFailure {
        kind,
        message: format!("HTTP {status} {reason}"),
        http_status: Some(status),
        is_refusal: false,
        retryable: transient,
        retry_after: if transient { retry_after } else { None },
    }
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let secs = (when.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    Some(Duration::from_secs(secs.max(0) as u64))
}

/// Whether one `X-Robots-Tag` value forbids use for AI training, for all agents or for `token`.
pub fn robots_disallow(value: &str, token: &str) -> bool {
    const DISALLOWED: [&str; 4] = ["noai", "noimageai", "noindex", "noimageindex"];
    let (agent, directives) = match value.split_once(':') {
        Some((a, d)) => (Some(a.trim().to_ascii_lowercase()), d),
        None => (None, value),
    };
    if agent
        .as_deref()
        .is_some_and(|a| a != token.to_ascii_lowercase())
    {
        return false;
    }
    directives
        .split(',')
        .map(|d| d.trim().to_ascii_lowercase())
        .any(|d| DISALLOWED.contains(&d.as_str()))
}

/// Maps a reqwest error to a failure kind; transport errors are retryable, refusals are not.
fn classify(e: reqwest::Error) -> FetchFailure {
    let mut src: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return FetchFailure::new("ssrf_refused", r.0.clone());
        }
        src = s.source();
    }
    let chain = error_chain(&e);
    // A malformed or oversized response head comes back the same on every attempt.
    let mut src: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            // (hyper's `is_parse_too_large` exists on servers only; its message is stable.)
            if h.is_parse() && h.to_string().contains("too large") {
                return FetchFailure::new("header_too_large", chain);
            }
            if h.is_parse() || h.is_parse_status() {
                return FetchFailure::new("invalid_response", chain);
            }
        }
        src = s.source();
    }
    if e.is_timeout() {
        return FetchFailure::new("timeout", chain).retryable();
    }
    if e.is_connect() {
        if chain.contains("dns error") || chain.contains("failed to lookup") {
            return FetchFailure::new("dns", chain);
        }
        return FetchFailure::new("connect", chain).retryable();
    }
    if e.is_redirect() {
        return FetchFailure::new("too_many_redirects", chain);
    }
    if e.is_body() || e.is_decode() || e.is_request() {
        let lower = chain.to_ascii_lowercase();
        if lower.contains("before message length reached")
            || lower.contains("unexpected end of file")
        {
            return FetchFailure::new("truncated", chain).retryable();
        }
        if lower.contains("reset")
            || lower.contains("broken pipe")
            || lower.contains("closed")
            || lower.contains("incomplete")
            || lower.contains("unexpected eof")
        {
            return FetchFailure::new("connection_reset", chain).retryable();
        }
        return FetchFailure::new("transport", chain).retryable();
    }
    FetchFailure::new("transport", chain).retryable()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_and_private_addresses() {
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "142.250.0.1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    /// IPv6 forms that carry an IPv4 address are classified by that address (the security
    /// review reached loopback through `[::127.0.0.1]`, `[2002:7f00:1::1]` and
    /// `[::ffff:0:7f00:1]`), and special-purpose ranges are never public.
    #[test]
    fn ipv6_forms_of_ipv4_addresses() {
        for ip in [
            "::127.0.0.1",                          // IPv4-compatible
            "::10.0.0.1",                           //
            "2002:7f00:1::1",                       // 6to4 of 127.0.0.1
            "2002:a9fe:a9fe::1",                    // 6to4 of 169.254.169.254
            "2002:c0a8:101::",                      // 6to4 of 192.168.1.1
            "::ffff:0:7f00:1",                      // IPv4-translated 127.0.0.1
            "::ffff:0:a00:1",                       //
            "64:ff9b::7f00:1",                      // NAT64 of 127.0.0.1
            "64:ff9b:1::808:808",                   // local-use NAT64
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo, client 127.0.0.1
            "100::1",                               // discard-only
            "2001:2::1",                            // benchmarking
            "2001:10::1",                           // ORCHID
            "2001:20::1",                           // ORCHIDv2
            "3fff::1",                              // documentation
            "2001:db8::1",                          // documentation
            "fec0::1",                              // site local
            "ff02::1",                              // multicast
            "4000::1",                              // outside 2000::/3
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "::8.8.8.8",
            "2002:808:808::1",
            "::ffff:0:808:808",
            "64:ff9b::808:808",
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7", // Teredo, client 8.8.8.8
            "2a00:1450:4001:80b::200e",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn robots_header_values() {
        assert!(robots_disallow("noai", "llamagen"));
        assert!(robots_disallow("noindex, nofollow", "llamagen"));
        assert!(robots_disallow("NoImageAI", "llamagen"));
        assert!(robots_disallow("llamagen: noai", "llamagen"));
        assert!(!robots_disallow("googlebot: noindex", "llamagen"));
        assert!(!robots_disallow("nofollow, noarchive", "llamagen"));
        assert!(!robots_disallow("all", "llamagen"));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
