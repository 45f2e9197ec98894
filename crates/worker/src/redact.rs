//! Redaction of secrets carried in URLs before they reach a log line: a URL's userinfo
//! (`user:pass@`) and the values of query (and fragment) parameters whose name looks like a
//! credential become `REDACTED`. Presigned URLs (S3 `X-Amz-*`, GCS `X-Goog-*`, Azure `sig`) and
//! `?token=` style webhooks are the usual carriers. The log formatter (`telemetry`) passes every
//! message and field through [`urls_in`], so no log line needs to remember to.

use std::borrow::Cow;

/// What replaces a secret.
pub const REDACTED: &str = "REDACTED";

/// Name parts that mark a parameter as a credential wherever they occur in the name.
const SECRET_SUBSTRINGS: &[&str] = &[
    "token",
    "secret",
    "passw",
    "signature",
    "credential",
    "apikey",
    "accesskey",
    "authorization",
    "sessionid",
];

/// Whole name parts (split at `_`, `-`, `.`) that mark a parameter as a credential.
const SECRET_WORDS: &[&str] = &[
    "key", "sig", "pwd", "pass", "auth", "jwt", "code", "session",
];

/// Name prefixes of cloud presigned-URL parameters, all of which are redacted.
const SECRET_PREFIXES: &[&str] = &["x-amz-", "x-goog-", "x-ms-"];

/// Whether a query parameter named `name` carries a credential.
pub fn is_secret_param(name: &str) -> bool {
    let name: String = percent_encoding::percent_decode_str(name)
        .decode_utf8_lossy()
        .to_ascii_lowercase();
    SECRET_PREFIXES.iter().any(|p| name.starts_with(p))
        || SECRET_SUBSTRINGS.iter().any(|s| name.contains(s))
        || name
            .split(['_', '-', '.'])
            .any(|part| SECRET_WORDS.contains(&part))
}

/// `pairs` (`a=1&b=2`) with the values of credential parameters replaced; everything else kept
/// byte for byte.
fn redact_pairs(pairs: &str) -> String {
    pairs
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_param(name) => format!("{name}={REDACTED}"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `url` with its userinfo and credential parameters redacted. Text that is not a URL is
/// returned unchanged, apart from anything that looks like userinfo or a query.
pub fn url(url: &str) -> String {
    // Split by hand rather than parse and re-serialise: the rest of the URL stays as written.
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((head, fragment)) => (head, Some(fragment)),
        None => (url, None),
    };
    let (base, query) = match before_fragment.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (before_fragment, None),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(&redact_userinfo(base));
    if let Some(query) = query {
        out.push('?');
        out.push_str(&redact_pairs(query));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(&redact_pairs(fragment));
    }
    out
}

/// `scheme://user:pass@host/...` → `scheme://REDACTED@host/...`.
fn redact_userinfo(base: &str) -> Cow<'_, str> {
    let Some(authority_start) = base.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(base);
    };
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    match base[authority_start..authority_end].rfind('@') {
        Some(at) => Cow::Owned(format!(
            "{}{REDACTED}{}",
            &base[..authority_start],
            &base[authority_start + at..]
        )),
        None => Cow::Borrowed(base),
    }
}

/// `text` with every `http://` or `https://` URL in it redacted (log messages that quote a URL,
/// such as reqwest's `... for url (...)`).
pub fn urls_in(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    // ASCII lowercasing keeps byte offsets, so positions found in `lower` index `text`.
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    while let Some(start) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| lower[done..].find(scheme))
        .min()
        .map(|i| done + i)
    {
        out.push_str(&text[done..start]);
        let tail = &text[start..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '<' | '>'))
            .unwrap_or(tail.len());
        // A sentence's full stop or comma after a URL is not part of it.
        let end = tail[..end].trim_end_matches(['.', ',', ';', ':']).len();
        out.push_str(&url(&tail[..end]));
        done = start + end.max(1);
    }
    out.push_str(&text[done..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_and_credential_parameters_are_redacted_and_the_rest_is_kept() {
        assert_eq!(
            url("https://alice:s3cret@example.com:8443/v2/ep/job-take/w?gpu=x&token=abc#frag"),
            "https://REDACTED@example.com:8443/v2/ep/job-take/w?gpu=x&token=REDACTED#frag"
        );
        assert_eq!(
            url("http://user@host/path?q=1"),
            "http://REDACTED@host/path?q=1"
        );
        assert_eq!(
            url("http://host/a@b?x=1"),
            "http://host/a@b?x=1",
            "an @ in the path is not userinfo"
        );
        assert_eq!(url("http://host/path"), "http://host/path");
        assert_eq!(url("not a url"), "not a url");
    }

    #[test]
    fn presigned_url_parameters_of_s3_gcs_and_azure_are_redacted() {
        let s3 = url("https://b.s3.amazonaws.com/k.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=deadbeef&X-Amz-Security-Token=tok");
        assert!(!s3.contains("AKIA") && !s3.contains("deadbeef") && !s3.contains("=tok"));
        assert!(s3.contains("X-Amz-Signature=REDACTED"), "{s3}");
        let gcs = url("https://storage.googleapis.com/b/o?X-Goog-Signature=ff00&alt=media");
        assert_eq!(
            gcs,
            "https://storage.googleapis.com/b/o?X-Goog-Signature=REDACTED&alt=media"
        );
        let azure = url("https://a.blob.core.windows.net/c/d?sv=2022&sig=abc%3D&se=2030");
        assert_eq!(
            azure,
            "https://a.blob.core.windows.net/c/d?sv=2022&sig=REDACTED&se=2030"
        );
        let old_s3 = url("https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIA&Signature=x&Expires=1");
        assert_eq!(
            old_s3,
            "https://b.s3.amazonaws.com/k?AWSAccessKeyId=REDACTED&Signature=REDACTED&Expires=1"
        );
    }

    #[test]
    fn credential_names_are_recognised_and_ordinary_ones_are_not() {
        for name in [
            "token",
            "access_token",
            "api_key",
            "apiKey",
            "key",
            "client_secret",
            "password",
            "sig",
            "auth",
            "X-Amz-Date",
            "session-id",
            "code",
            "%74oken",
        ] {
            assert!(is_secret_param(name), "{name}");
        }
        for name in [
            "gpu",
            "job_id",
            "isStream",
            "author",
            "monkey",
            "page",
            "batch_size",
        ] {
            assert!(!is_secret_param(name), "{name}");
        }
    }

    #[test]
    fn urls_inside_a_message_are_redacted_where_they_stand() {
        assert_eq!(
            urls_in("error decoding response body for url (http://u:p@h/x?token=t&a=1)"),
            "error decoding response body for url (http://REDACTED@h/x?token=REDACTED&a=1)"
        );
        assert_eq!(
            urls_in("two: https://h/?key=1 and HTTP://h/?sig=2."),
            "two: https://h/?key=REDACTED and HTTP://h/?sig=REDACTED."
        );
        assert_eq!(urls_in("no url here"), "no url here");
    }

    #[tokio::test]
    async fn a_reqwest_error_as_displayed_loses_its_token() {
        let error = reqwest::Client::new()
            .get("http://127.0.0.1:1/x?token=s3cret&gpu=a")
            .send()
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("s3cret"), "reqwest prints it: {error}");
        let shown = urls_in(&error);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("token=REDACTED&gpu=a"), "{shown}");
    }
}
