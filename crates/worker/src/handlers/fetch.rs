//! Fetching a document from a URL without becoming a proxy into the worker's network: http and
//! https only; the host is resolved first and refused if any address is private, loopback,
//! link-local or otherwise internal (unless the config allows it), and the connection is pinned
//! to the addresses checked (no DNS rebinding); redirects are not followed; size and time are
//! bounded.

use std::net::SocketAddr;
use std::time::Duration;

use docparse::wire::Encoding;

use crate::outcome::{is_out_of_file_descriptors, JobError};
pub use runpod_protocol::address::is_internal;

/// Limits on fetching.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Fetch addresses that are private, loopback or link-local.
    pub allow_private: bool,
    /// Largest body accepted.
    pub max_bytes: usize,
    /// Time limit for the whole fetch.
    pub timeout: Duration,
}

/// A fetched body, as it came (decompressing it is the parser's work, under its limits).
#[derive(Debug)]
pub struct Fetched {
    /// The body.
    pub bytes: Vec<u8>,
    /// The server said it is HTML.
    pub html: bool,
    /// Its `Content-Encoding`.
    pub encoding: Encoding,
}

/// Fetches `url` under `policy`.
pub async fn fetch(url: &str, policy: &FetchPolicy) -> Result<Fetched, JobError> {
    let invalid = |message: String| JobError::invalid_input(message);
    let parsed = url::Url::parse(url)
        .map_err(|e| invalid(format!("input.document.url is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "only http and https URLs are fetched, not {}:",
            parsed.scheme()
        )));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| invalid("the URL has no host".to_owned()))?
        .to_owned();
    // The URL may be presigned: its userinfo and token parameters never reach the log.
    tracing::debug!("fetching {}", crate::redact::url(url));
    let port = parsed.port_or_known_default().unwrap_or(80);
    let lookup = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addresses: Vec<SocketAddr> = tokio::time::timeout(
        policy.timeout,
        tokio::net::lookup_host((lookup.as_str(), port)),
    )
    .await
    .map_err(|_| {
        invalid(format!(
            "resolving {host} took longer than {} s",
            policy.timeout.as_secs()
        ))
    })?
    .map_err(|e| {
        if is_out_of_file_descriptors(&e) {
            JobError::out_of_file_descriptors("the URL's host could not be resolved")
        } else {
            invalid(format!("cannot resolve the URL's host {host}"))
        }
    })?
    .collect();
    if addresses.is_empty() {
        return Err(invalid(format!("cannot resolve the URL's host {host}")));
    }
    if !policy.allow_private && addresses.iter().any(|a| is_internal(a.ip())) {
        return Err(invalid(format!(
            "the URL's host {host} is a private, loopback or link-local address, which this worker does not fetch"
        )));
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve the host itself and undo the checks above.
        .no_proxy()
        // A backstop behind the deadline below, which names the cause.
        .timeout(policy.timeout + Duration::from_secs(1))
        .resolve_to_addrs(&lookup, &addresses)
        .user_agent(concat!("runpod-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|_| JobError::internal("cannot build an HTTP client"))?;
    // One deadline for the whole document, its headers and every byte of its body: a server
    // that trickles its body is named as slow, not as an unreadable body.
    let deadline = tokio::time::Instant::now() + policy.timeout;
    let too_slow = || {
        invalid(format!(
            "the URL did not send its document within {} s (url_timeout_s)",
            policy.timeout.as_secs()
        ))
    };
    let sent = tokio::time::timeout_at(deadline, client.get(parsed.clone()).send())
        .await
        .map_err(|_| too_slow())?;
    let mut response = sent.map_err(|e| {
        if is_out_of_file_descriptors(&e) {
            JobError::out_of_file_descriptors("the URL could not be fetched")
        } else if e.is_timeout() {
            invalid(format!(
                "the URL did not answer within {} s",
                policy.timeout.as_secs()
            ))
        } else {
            invalid(format!(
                "the URL could not be fetched ({})",
                e.without_url()
            ))
        }
    })?;
    let status = response.status();
    if status.is_redirection() {
        return Err(invalid(format!(
            "the URL answered {status} (a redirect); redirects are not followed"
        )));
    }
    if !status.is_success() {
        return Err(invalid(format!("the URL answered {}", status.as_u16())));
    }
    let too_large = || {
        invalid(format!(
            "the URL's document is over the limit of {} bytes",
            policy.max_bytes
        ))
    };
    if response
        .content_length()
        .is_some_and(|n| n > policy.max_bytes as u64)
    {
        return Err(too_large());
    }
    let html = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("html"));
    let encoding = match response
        .headers()
        .get(reqwest::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("identity") => Encoding::Identity,
        Some("gzip" | "x-gzip") => Encoding::Gzip,
        Some("deflate") => Encoding::Deflate,
        Some(other) => {
            let other: String = other.chars().take(40).collect();
            return Err(invalid(format!(
                "the URL's body is encoded as {other:?}; gzip and deflate are read"
            )));
        }
    };
    let mut bytes = Vec::new();
    loop {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .map_err(|_| too_slow())?
            .map_err(|e| {
                if e.is_timeout() {
                    too_slow()
                } else {
                    invalid(format!(
                        "the URL's body could not be read ({})",
                        e.without_url()
                    ))
                }
            })?;
        let Some(chunk) = chunk else {
            break;
        };
        if bytes.len() + chunk.len() > policy.max_bytes {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        bytes,
        html,
        encoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "fec0::1",
            "64:ff9b::a9fe:a9fe",
            "2002:c0a8:0101::1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_body_that_trickles_past_the_timeout_is_named_slow() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/doc", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            // Two bytes every 300 ms: well within any per-read timeout, never done in time.
            for _ in 0..500 {
                if socket.write_all(b"ab").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        let policy = FetchPolicy {
            allow_private: true,
            max_bytes: 10_000,
            timeout: Duration::from_secs(1),
        };
        let error = fetch(&url, &policy).await.unwrap_err();
        assert!(
            error
                .message
                .contains("did not send its document within 1 s (url_timeout_s)"),
            "{}",
            error.message
        );
    }

    #[tokio::test]
    async fn other_schemes_and_internal_hosts_are_refused_before_any_connection() {
        let policy = FetchPolicy {
            allow_private: false,
            max_bytes: 1000,
            timeout: Duration::from_secs(5),
        };
        let file = fetch("file:///etc/passwd", &policy).await.unwrap_err();
        assert!(
            file.message.contains("only http and https"),
            "{}",
            file.message
        );
        let metadata = fetch("http://169.254.169.254/latest/meta-data", &policy)
            .await
            .unwrap_err();
        assert!(
            metadata.message.contains("private, loopback or link-local"),
            "{}",
            metadata.message
        );
        let local = fetch("http://localhost:1/", &policy).await.unwrap_err();
        assert!(
            local.message.contains("private, loopback or link-local"),
            "{}",
            local.message
        );
    }
}
