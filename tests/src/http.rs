//! An HTTP/1.1 server on 127.0.0.1 that serves the bundled real images and, on purpose, the
//! faults a crawler meets on the web. Routes (all GET):
//! - `/img/<path>`: the file `data/images/<path>`;
//! - `/status/<code>`: that status with a short body;
//! - `/flaky/<id>/<n>/<path>`: 503 for the first `n` requests of `id`, then the image;
//! - `/retry-after/<id>/<path>`: 429 with `Retry-After: 1` once, then the image;
//! - `/html`: an HTML page served as 200; `/corrupt`: random bytes labelled image/jpeg;
//! - `/truncated/<path>`: announces the full length, sends half, closes;
//! - `/reset`: closes the connection with a TCP reset without answering;
//! - `/slow-headers`: waits 30 s before answering; `/drip/<path>`: one byte every 200 ms;
//! - `/redirect/<n>/<path>`: `n` redirects, then the image; `/redirect-to/<url>`: one redirect to
//!   `<url>` (percent-encoded);
//! - `/noai/<path>`: the image with `X-Robots-Tag: noai`; `/huge`: announces 100 MB.
//! - `/hang`: reads the request and never answers; `/endless`: a body without length that never
//!   ends (64 KiB every 10 ms); `/huge-header`: a 1 MiB response head.
//!
//! Every request's path and head are recorded, so a test can check what was (not) fetched and
//! which headers were sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct FaultServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    heads: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FaultServer {
    /// Starts the server on a free port (inside a tokio runtime).
    pub async fn start(root: PathBuf, delay: Duration) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Default::default();
        let heads: Arc<Mutex<Vec<String>>> = Default::default();
        let counters: Arc<Mutex<HashMap<String, u32>>> = Default::default();
        let (reqs, hds) = (requests.clone(), heads.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    break;
                };
                let (root, reqs, hds, counters) =
                    (root.clone(), reqs.clone(), hds.clone(), counters.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, &root, &reqs, &hds, &counters, delay).await;
                });
            }
        });
        FaultServer {
            addr,
            requests,
            heads,
            _task: task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Paths requested so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Request heads (request line and headers) received so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn content_type(path: &str) -> &'static str {
    match path
        .rsplit('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
        .as_str()
    {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        _ => "application/octet-stream",
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn respond(
    sock: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await?;
    sock.shutdown().await
}

async fn serve(
    mut sock: TcpStream,
    root: &std::path::Path,
    reqs: &Mutex<Vec<String>>,
    heads: &Mutex<Vec<String>>,
    counters: &Mutex<HashMap<String, u32>>,
    delay: Duration,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    reqs.lock().unwrap().push(path.clone());
    heads.lock().unwrap().push(text.to_string());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path_only = path.split('?').next().unwrap_or("").to_string();
    let parts: Vec<&str> = path_only.trim_start_matches('/').splitn(2, '/').collect();
    let image = |rel: &str| std::fs::read(root.join(percent_decode(rel))).ok();
    let count = |id: &str| {
        let mut c = counters.lock().unwrap();
        let e = c.entry(id.to_string()).or_insert(0);
        *e += 1;
        *e
    };
    match (parts[0], parts.get(1).copied().unwrap_or("")) {
        ("img", rel) => match image(rel) {
            Some(b) => {
                respond(
                    &mut sock,
                    "200 OK",
                    &[("Content-Type", content_type(rel).into())],
                    &b,
                )
                .await
            }
            None => respond(&mut sock, "404 Not Found", &[], b"no such image").await,
        },
        ("status", code) => {
            let reason = match code {
                "403" => "Forbidden",
                "404" => "Not Found",
                "410" => "Gone",
                "500" => "Internal Server Error",
                _ => "Status",
            };
            respond(&mut sock, &format!("{code} {reason}"), &[], b"error").await
        }
        ("flaky", rest) => {
            let mut it = rest.splitn(3, '/');
            let (id, n, rel) = (
                it.next().unwrap_or(""),
                it.next().unwrap_or("0"),
                it.next().unwrap_or(""),
            );
            if count(id) <= n.parse().unwrap_or(0) {
                respond(&mut sock, "503 Service Unavailable", &[], b"busy").await
            } else {
                let b = image(rel).unwrap_or_default();
                respond(
                    &mut sock,
                    "200 OK",
                    &[("Content-Type", content_type(rel).into())],
                    &b,
                )
                .await
            }
        }
        ("retry-after", rest) => {
            let (id, rel) = rest.split_once('/').unwrap_or((rest, ""));
            if count(id) == 1 {
                respond(
                    &mut sock,
                    "429 Too Many Requests",
                    &[("Retry-After", "1".into())],
                    b"slow down",
                )
                .await
            } else {
                let b = image(rel).unwrap_or_default();
                respond(
                    &mut sock,
                    "200 OK",
                    &[("Content-Type", content_type(rel).into())],
                    &b,
                )
                .await
            }
        }
        ("html", _) => {
            let page =
                b"<!DOCTYPE html><html><head><title>Image</title></head><body>moved</body></html>";
            respond(
                &mut sock,
                "200 OK",
                &[("Content-Type", "text/html".into())],
                page,
            )
            .await
        }
        ("corrupt", _) => {
            let junk: Vec<u8> = (0..5000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            respond(
                &mut sock,
                "200 OK",
                &[("Content-Type", "image/jpeg".into())],
                &junk,
            )
            .await
        }
        ("truncated", rel) => {
            let b = image(rel).unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                content_type(rel),
                b.len()
            );
            sock.write_all(head.as_bytes()).await?;
            sock.write_all(&b[..b.len() / 2]).await?;
            sock.shutdown().await
        }
        ("reset", _) => {
            // Linger 0 makes the close a TCP reset (and cannot block: nothing is left to send).
            #[allow(deprecated)]
            sock.set_linger(Some(Duration::ZERO))?;
            drop(sock);
            Ok(())
        }
        ("slow-headers", _) => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            respond(&mut sock, "200 OK", &[], b"late").await
        }
        ("drip", rel) => {
            let b = image(rel).unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                content_type(rel),
                b.len()
            );
            sock.write_all(head.as_bytes()).await?;
            for byte in b {
                sock.write_all(&[byte]).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(())
        }
        ("redirect", rest) => {
            let (n, rel) = rest.split_once('/').unwrap_or(("0", rest));
            let n: u32 = n.parse().unwrap_or(0);
            let to = if n <= 1 {
                format!("/img/{rel}")
            } else {
                format!("/redirect/{}/{rel}", n - 1)
            };
            respond(&mut sock, "302 Found", &[("Location", to)], b"").await
        }
        ("redirect-to", target) => {
            respond(
                &mut sock,
                "302 Found",
                &[("Location", percent_decode(target))],
                b"",
            )
            .await
        }
        ("noai", rel) => {
            let b = image(rel).unwrap_or_default();
            respond(
                &mut sock,
                "200 OK",
                &[
                    ("Content-Type", content_type(rel).into()),
                    ("X-Robots-Tag", "noai, noimageai".into()),
                ],
                &b,
            )
            .await
        }
        ("huge", _) => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n";
            sock.write_all(head.as_bytes()).await?;
            sock.write_all(&[0xff; 65536]).await?;
            sock.shutdown().await
        }
        ("hang", _) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
        ("endless", _) => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n";
            sock.write_all(head.as_bytes()).await?;
            let block = vec![0xffu8; 64 << 10];
            loop {
                sock.write_all(&block).await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        ("huge-header", _) => {
            let mut head = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..16384 {
                head.push_str(&format!("X-Filler-{i}: {}\r\n", "x".repeat(48)));
            }
            head.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
            sock.write_all(head.as_bytes()).await?;
            sock.shutdown().await
        }
        _ => respond(&mut sock, "404 Not Found", &[], b"unknown route").await,
    }
}
