//! What a person's browser does when they sign a device in, for the e2e tests: a small
//! blocking HTTP/1.1 client (plain http, `Connection: close`) and the walk through the
//! coordinator's sign-in page, the OpenID provider's login form (`oidc-provider-mock`'s, which
//! takes a subject) and the redirect back to the coordinator.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

impl Response {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request to an `http://` URL and reads the whole answer.
pub fn request(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: &str,
) -> anyhow::Result<Response> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut s =
        TcpStream::connect(authority).with_context(|| format!("connecting to {authority}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line from {url}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// What one sign-in walk saw.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The coordinator's callback URL the provider sent the browser to (state and code).
    pub callback: String,
    /// The coordinator's answer to it.
    pub page: Response,
}

/// Opens the sign-in page `login_url` (expecting it to show `code`), follows its link to the
/// provider, signs in there as `sub`, and follows the redirect back to the coordinator.
pub fn sign_in(login_url: &str, code: &str, sub: &str) -> anyhow::Result<SignedIn> {
    let page = request("GET", login_url, None, "")?;
    if page.status != 200 {
        bail!("the sign-in page answered {}: {}", page.status, page.body);
    }
    if !page.body.contains(code) {
        bail!(
            "the sign-in page does not show the code {code}:\n{}",
            page.body
        );
    }
    let href = page
        .body
        .split("href=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .context("no link to the identity provider on the sign-in page")?;
    let authorize = unescape(href);
    let form = request("GET", &authorize, None, "")?;
    if form.status != 200 {
        bail!("the provider's login form answered {}", form.status);
    }
    let back = request(
        "POST",
        &authorize,
        Some("application/x-www-form-urlencoded"),
        &format!("sub={sub}"),
    )?;
    let callback = back
        .header("location")
        .with_context(|| {
            format!(
                "the provider did not redirect ({}): {}",
                back.status, back.body
            )
        })?
        .to_owned();
    let page = request("GET", &callback, None, "")?;
    Ok(SignedIn { callback, page })
}

/// The sign-in link and code a `lattice up` or `lattice login` printed, if it did.
pub fn prompt(output: &str) -> Option<(String, String)> {
    let url = output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("To authenticate, visit: "))?
        .trim()
        .to_owned();
    let code = url.split("code=").nth(1)?.to_owned();
    Some((url, code))
}
