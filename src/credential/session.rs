//! The session method: logs in through Dex in front of the platform (Kubeflow style) with a
//! user name and password and lends the authservice session cookie; also the helpers the
//! proxy uses to spot a redirect into the login flow and to keep the session's Set-Cookie
//! from callers.

use std::time::Duration;

use http::header::{ACCEPT, COOKIE, LOCATION, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use reqwest::cookie::{CookieStore, Jar};
use url::Url;

use super::{Acquired, FetchError, Schedule};
use crate::config::{is_loopback_url, DEFAULT_PATH_PREFIX};
use crate::outbound::describe;
use crate::secret::{Secret, SecretSource};

/// Redirects followed in each leg of the login (to the form, and from the form's answer on).
const MAX_REDIRECTS: usize = 10;
/// How long a session cookie without Max-Age or Expires is assumed to last; an upstream 401
/// replaces it sooner.
const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Pages larger than this are not login pages.
const MAX_PAGE_BYTES: usize = 1024 * 1024;
/// Connector-choice pages passed through on the way to the password form.
const MAX_CHOICE_PAGES: usize = 3;

/// The session source: where to start, who logs in, and which cookie is the session.
pub struct Session {
    http: reqwest::Client,
    /// A platform page behind authservice: the upstream's API root.
    start: Url,
    username: String,
    password: SecretSource,
    cookie_name: String,
    /// The password may also go over plain http to another machine (a mesh encrypts).
    allow_plain_http: bool,
}

/// A URL without its query and fragment, which may carry codes and state: safe to print.
pub fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

fn configuration(message: String) -> FetchError {
    FetchError::configuration(message)
}

/// The session cookie as the login's last step set it.
struct SessionCookie {
    value: Secret,
    lifetime: Option<Duration>,
}

/// One page the login reached.
struct Page {
    url: Url,
    status: StatusCode,
    body: String,
}

/// A login form found on a page.
#[derive(Debug, Default, PartialEq)]
struct Form {
    action: Option<String>,
    inputs: Vec<Input>,
}

#[derive(Debug, PartialEq)]
struct Input {
    name: String,
    kind: String,
    value: String,
}

impl Form {
    fn has_password(&self) -> bool {
        self.inputs.iter().any(|i| i.kind == "password")
    }

    fn hidden(&self) -> Vec<(String, String)> {
        self.inputs
            .iter()
            .filter(|i| i.kind == "hidden" && !i.name.is_empty())
            .map(|i| (i.name.clone(), i.value.clone()))
            .collect()
    }

    /// The names of the user and password fields (Dex: `login` and `password`).
    fn credential_fields(&self) -> (String, String) {
        let password = self
            .inputs
            .iter()
            .find(|i| i.kind == "password" && !i.name.is_empty())
            .map(|i| i.name.clone())
            .unwrap_or_else(|| "password".into());
        let user = self
            .inputs
            .iter()
            .find(|i| i.name == "login")
            .or_else(|| {
                self.inputs.iter().find(|i| {
                    matches!(i.kind.as_str(), "text" | "email" | "") && !i.name.is_empty()
                })
            })
            .map(|i| i.name.clone())
            .unwrap_or_else(|| "login".into());
        (user, password)
    }
}

/// The state of one login attempt: its own cookie jar, the hosts the redirects went
/// through, and the session cookie once set.
struct Flow<'a> {
    session: &'a Session,
    jar: Jar,
    hosts: Vec<(String, Option<u16>)>,
    cookie: Option<SessionCookie>,
}

impl Session {
    pub fn new(
        upstream: &Url,
        username: String,
        password: SecretSource,
        cookie_name: String,
        allow_plain_http: bool,
        http: reqwest::Client,
    ) -> anyhow::Result<Session> {
        let base = upstream.as_str().trim_end_matches('/');
        let start = Url::parse(&format!("{base}{DEFAULT_PATH_PREFIX}"))?;
        if cookie_name.is_empty() || cookie_name.contains(['=', ';', ' ', ',']) {
            anyhow::bail!("session_cookie_name: `{cookie_name}` is not a cookie name");
        }
        Ok(Session {
            http,
            start,
            username,
            password,
            cookie_name,
            allow_plain_http,
        })
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    pub fn password_file(&self) -> Option<&std::path::Path> {
        self.password.file()
    }

    /// Logs in afresh and returns the session cookie as a `Cookie` header.
    pub async fn acquire(&self) -> Result<Acquired, FetchError> {
        let mut flow = Flow {
            session: self,
            jar: Jar::default(),
            hosts: Vec::new(),
            cookie: None,
        };
        let mut page = flow
            .follow(Method::GET, self.start.clone(), None, "open the platform")
            .await?;
        let mut form = None;
        for _ in 0..MAX_CHOICE_PAGES {
            if flow.cookie.is_some() {
                break;
            }
            let forms = forms(&page.body);
            if let Some(found) = forms.into_iter().find(Form::has_password) {
                form = Some(found);
                break;
            }
            match connector_link(&page.body).and_then(|href| page.url.join(&href).ok()) {
                Some(next) => {
                    page = flow
                        .follow(Method::GET, next, None, "choose Dex's password login")
                        .await?;
                }
                None => break,
            }
        }
        if let Some(cookie) = flow.cookie.take() {
            return self.credential(cookie);
        }
        let form = form.ok_or_else(|| {
            configuration(format!(
                "session login: {} (HTTP {}) shows no login form after the redirects from the platform; is the platform behind Dex and authservice?",
                redact(&page.url),
                page.status.as_u16()
            ))
        })?;
        let action = match &form.action {
            Some(action) if !action.is_empty() => page.url.join(action).map_err(|_| {
                configuration(format!(
                    "session login: the login form at {} has an unusable action",
                    redact(&page.url)
                ))
            })?,
            _ => page.url.clone(),
        };
        flow.check_password_target(&action)?;
        let password = self
            .password
            .read()
            .map_err(|e| configuration(format!("session login: cannot read password_file: {e}")))?;
        let (user_field, password_field) = form.credential_fields();
        let mut fields = form.hidden();
        fields.push((user_field, self.username.clone()));
        fields.push((password_field, password.expose().to_owned()));
        let answer = flow
            .follow(
                Method::POST,
                action.clone(),
                Some(fields),
                "post the login form",
            )
            .await?;
        if let Some(cookie) = flow.cookie.take() {
            return self.credential(cookie);
        }
        let answer_forms = forms(&answer.body);
        if answer_forms.iter().any(Form::has_password)
            || matches!(
                answer.status,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            )
        {
            return Err(configuration(format!(
                "session login: Dex rejected the username or password at {} (user `{}`)",
                redact(&action),
                self.username
            )));
        }
        if let Some(approval) = answer_forms.iter().find(|f| is_approval(f)) {
            let target = match &approval.action {
                Some(a) if !a.is_empty() => answer.url.join(a).ok(),
                _ => Some(answer.url.clone()),
            };
            if let Some(target) = target {
                let last = flow
                    .follow(
                        Method::POST,
                        target,
                        Some(approval.hidden()),
                        "grant Dex's approval",
                    )
                    .await?;
                if let Some(cookie) = flow.cookie.take() {
                    return self.credential(cookie);
                }
                return Err(flow.no_cookie(&last));
            }
        }
        Err(flow.no_cookie(&answer))
    }

    fn credential(&self, cookie: SessionCookie) -> Result<Acquired, FetchError> {
        let mut value =
            HeaderValue::try_from(format!("{}={}", self.cookie_name, cookie.value.expose()))
                .map_err(|_| {
                    configuration(
                        "session login: the session cookie is not valid in a header".into(),
                    )
                })?;
        value.set_sensitive(true);
        Ok(Acquired {
            header_name: COOKIE,
            header_value: value,
            schedule: Schedule::new(cookie.lifetime.unwrap_or(DEFAULT_SESSION_LIFETIME)),
            refresh_token: None,
            grant: "session_login",
            token: None,
            warning: None,
        })
    }
}

fn is_approval(form: &Form) -> bool {
    form.inputs
        .iter()
        .any(|i| i.name == "approval" && i.value == "approve")
}

fn origin_key(url: &Url) -> (String, Option<u16>) {
    (
        url.host_str().unwrap_or_default().to_ascii_lowercase(),
        url.port_or_known_default(),
    )
}

impl Flow<'_> {
    /// The password goes only over HTTPS (or to loopback, or plain http when allowed) and
    /// only to a host the redirects from the platform went through.
    fn check_password_target(&self, target: &Url) -> Result<(), FetchError> {
        let encrypted = target.scheme() == "https";
        let allowed_plain =
            target.scheme() == "http" && (is_loopback_url(target) || self.session.allow_plain_http);
        if !encrypted && !allowed_plain {
            return Err(configuration(format!(
                "session login: refusing to send the password to {}: it is not https (only loopback may use plain http, or pass --allow-plain-http when a mesh encrypts)",
                redact(target)
            )));
        }
        if !self.hosts.contains(&origin_key(target)) {
            return Err(configuration(format!(
                "session login: refusing to send the password to {}: that host did not appear in the redirects from the platform",
                redact(target)
            )));
        }
        Ok(())
    }

    fn no_cookie(&self, last: &Page) -> FetchError {
        configuration(format!(
            "session login: the login form was accepted but no `{}` cookie was set (last step {} answered HTTP {}); check session_cookie_name",
            self.session.cookie_name,
            redact(&last.url),
            last.status.as_u16()
        ))
    }

    /// Takes the session cookie from a response's Set-Cookie headers when one sets it.
    fn capture(&mut self, headers: &HeaderMap) {
        for value in headers.get_all(SET_COOKIE) {
            let Ok(text) = value.to_str() else { continue };
            if let Some(cookie) = session_cookie(text, &self.session.cookie_name) {
                self.cookie = Some(cookie);
            }
        }
    }

    /// Sends one request and follows its redirects (turning them into GETs, as browsers do)
    /// until a page, or until the session cookie is set.
    async fn follow(
        &mut self,
        mut method: Method,
        mut url: Url,
        mut form: Option<Vec<(String, String)>>,
        step: &str,
    ) -> Result<Page, FetchError> {
        let mut redirects = 0;
        loop {
            let key = origin_key(&url);
            if !self.hosts.contains(&key) {
                self.hosts.push(key);
            }
            tracing::debug!(%method, url = %redact(&url), "session login: {step}");
            let mut request = self
                .session
                .http
                .request(method.clone(), url.clone())
                .header(ACCEPT, "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8");
            if let Some(mut cookies) = self.jar.cookies(&url) {
                cookies.set_sensitive(true);
                request = request.header(COOKIE, cookies);
            }
            if let Some(fields) = &form {
                request = request.form(fields);
            }
            let response = request.send().await.map_err(|e| {
                FetchError::transient(format!(
                    "session login: cannot {step} at {}: {}",
                    redact(&url),
                    describe(&e)
                ))
            })?;
            let status = response.status();
            self.jar
                .set_cookies(&mut response.headers().get_all(SET_COOKIE).iter(), &url);
            self.capture(response.headers());
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(FetchError::transient(format!(
                    "session login: cannot {step}: {} answered HTTP {}",
                    redact(&url),
                    status.as_u16()
                )));
            }
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                if self.cookie.is_some() {
                    return Ok(Page {
                        url,
                        status,
                        body: String::new(),
                    });
                }
                if form.is_some()
                    && matches!(
                        status,
                        StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT
                    )
                {
                    return Err(configuration(format!(
                        "session login: {} answered the form with HTTP {}, which would re-send it elsewhere; refusing",
                        redact(&url),
                        status.as_u16()
                    )));
                }
                let next = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| {
                        configuration(format!(
                            "session login: {} answered HTTP {} without a usable Location",
                            redact(&url),
                            status.as_u16()
                        ))
                    })?;
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(configuration(format!(
                        "session login: more than {MAX_REDIRECTS} redirects while trying to {step} (last at {})",
                        redact(&url)
                    )));
                }
                method = Method::GET;
                form = None;
                url = next;
                continue;
            }
            let body = read_limited(response).await.map_err(|e| {
                FetchError::transient(format!(
                    "session login: cannot {step}: reading {} failed: {}",
                    redact(&url),
                    describe(&e)
                ))
            })?;
            return Ok(Page { url, status, body });
        }
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<String, reqwest::Error> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_PAGE_BYTES {
            bytes.truncate(MAX_PAGE_BYTES);
            break;
        }
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The session cookie a Set-Cookie header sets, with its lifetime; `None` for another
/// cookie or for one that deletes it.
fn session_cookie(set_cookie: &str, name: &str) -> Option<SessionCookie> {
    let parsed = cookie::Cookie::parse(set_cookie).ok()?;
    if parsed.name() != name || parsed.value().is_empty() {
        return None;
    }
    let lifetime = match (parsed.max_age(), parsed.expires_datetime()) {
        (Some(max_age), _) => Some(Duration::from_secs(
            u64::try_from(max_age.whole_seconds()).unwrap_or(0),
        )),
        (None, Some(expires)) => {
            let left = expires - cookie::time::OffsetDateTime::now_utc();
            Some(Duration::from_secs(
                u64::try_from(left.whole_seconds()).unwrap_or(0),
            ))
        }
        (None, None) => None,
    };
    if lifetime == Some(Duration::ZERO) {
        return None;
    }
    Some(SessionCookie {
        value: Secret::new(parsed.value()),
        lifetime,
    })
}

/// Whether a redirect the upstream answered with sends the caller into a login flow
/// (authservice or oauth2-proxy handing an unauthenticated request to Dex or another IdP)
/// rather than to another platform page. For the proxy: a 3xx whose Location this accepts
/// means the lent session is gone, like a 401.
pub fn is_login_redirect(location: &str, upstream: &Url) -> bool {
    let Ok(target) = upstream.join(location.trim()) else {
        return false;
    };
    let path = target.path().to_ascii_lowercase();
    const LOGIN_PATHS: [&str; 6] = [
        "/dex/auth",
        "/oauth2/start",
        "/oauth2/sign_in",
        "/authservice/",
        "/protocol/openid-connect/auth",
        "/login/oauth/authorize",
    ];
    if LOGIN_PATHS.iter().any(|p| path.contains(p)) {
        return true;
    }
    let mut has_client = false;
    let mut has_redirect = false;
    for (key, _) in target.query_pairs() {
        match key.as_ref() {
            "client_id" => has_client = true,
            "redirect_uri" | "response_type" => has_redirect = true,
            _ => {}
        }
    }
    has_client && has_redirect
}

/// Removes every `Set-Cookie` that sets `cookie_name` (the lent session), keeping the others.
/// Returns how many were removed.
pub fn strip_session_set_cookie(headers: &mut HeaderMap, cookie_name: &str) -> usize {
    let all: Vec<HeaderValue> = headers.get_all(SET_COOKIE).iter().cloned().collect();
    let sets_session = |v: &HeaderValue| {
        v.to_str()
            .ok()
            .and_then(|t| t.split_once('='))
            .is_some_and(|(name, _)| name.trim() == cookie_name)
    };
    let removed = all.iter().filter(|v| sets_session(v)).count();
    if removed > 0 {
        headers.remove(SET_COOKIE);
        for value in all.into_iter().filter(|v| !sets_session(v)) {
            headers.append(SET_COOKIE, value);
        }
    }
    removed
}

// ---------- a small HTML reader: tags and attributes, enough for login forms ----------

struct Tag {
    /// Lower case; closing tags start with `/`.
    name: String,
    attrs: Vec<(String, String)>,
}

impl Tag {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The tags of a page in order, skipping comments and the contents of scripts and styles.
fn tags(html: &str) -> Vec<Tag> {
    let bytes = html.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(offset) = html[i..].find('<') {
        let start = i + offset + 1;
        if html[start..].starts_with("!--") {
            i = html[start..]
                .find("-->")
                .map_or(bytes.len(), |e| start + e + 3);
            continue;
        }
        let name_end = html[start..]
            .find(|c: char| c.is_ascii_whitespace() || c == '>' || c == '/')
            .map_or(bytes.len(), |e| start + e);
        // A closing tag keeps its slash: `</form>`.
        let (name, mut j) = if html[start..].starts_with('/') {
            let end = html[start + 1..]
                .find(|c: char| c.is_ascii_whitespace() || c == '>')
                .map_or(bytes.len(), |e| start + 1 + e);
            (
                format!("/{}", html[start + 1..end].to_ascii_lowercase()),
                end,
            )
        } else {
            (html[start..name_end].to_ascii_lowercase(), name_end)
        };
        if name.is_empty()
            || !name
                .trim_start_matches('/')
                .starts_with(|c: char| c.is_ascii_alphabetic())
        {
            i = start;
            continue;
        }
        let mut attrs = Vec::new();
        loop {
            while j < bytes.len() && (bytes[j].is_ascii_whitespace() || bytes[j] == b'/') {
                j += 1;
            }
            if j >= bytes.len() || bytes[j] == b'>' {
                j += 1;
                break;
            }
            let key_start = j;
            while j < bytes.len()
                && !bytes[j].is_ascii_whitespace()
                && !matches!(bytes[j], b'=' | b'>' | b'/')
            {
                j += 1;
            }
            let key = html[key_start..j].to_ascii_lowercase();
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            let mut value = String::new();
            if j < bytes.len() && bytes[j] == b'=' {
                j += 1;
                while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                    j += 1;
                }
                if j < bytes.len() && (bytes[j] == b'"' || bytes[j] == b'\'') {
                    let quote = bytes[j] as char;
                    let end = html[j + 1..].find(quote).map_or(bytes.len(), |e| j + 1 + e);
                    value = decode_entities(&html[j + 1..end]);
                    j = (end + 1).min(bytes.len());
                } else {
                    let end = html[j..]
                        .find(|c: char| c.is_ascii_whitespace() || c == '>')
                        .map_or(bytes.len(), |e| j + e);
                    value = decode_entities(&html[j..end]);
                    j = end;
                }
            }
            if !key.is_empty() {
                attrs.push((key, value));
            }
        }
        let skip_to = match name.as_str() {
            "script" | "style" => html[j.min(bytes.len())..]
                .to_ascii_lowercase()
                .find(&format!("</{name}"))
                .map(|e| j + e),
            _ => None,
        };
        out.push(Tag { name, attrs });
        i = skip_to.unwrap_or(j).min(bytes.len());
    }
    out
}

/// Decodes the character references found in attribute values.
fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.bytes().take(12).position(|b| b == b';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The forms of a page with their inputs.
fn forms(html: &str) -> Vec<Form> {
    let mut out: Vec<Form> = Vec::new();
    let mut open = false;
    for tag in tags(html) {
        match tag.name.as_str() {
            "form" => {
                out.push(Form {
                    action: tag.attr("action").map(str::to_owned),
                    inputs: Vec::new(),
                });
                open = true;
            }
            "/form" => open = false,
            "input" if open => {
                if let Some(form) = out.last_mut() {
                    form.inputs.push(Input {
                        name: tag.attr("name").unwrap_or_default().to_owned(),
                        kind: tag.attr("type").unwrap_or("text").to_ascii_lowercase(),
                        value: tag.attr("value").unwrap_or_default().to_owned(),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// On Dex's connector-choice page, the link to its password (local) connector.
fn connector_link(html: &str) -> Option<String> {
    tags(html)
        .into_iter()
        .filter(|t| t.name == "a")
        .filter_map(|t| t.attr("href").map(str::to_owned))
        .find(|href| href.contains("/auth/local"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEX_LOGIN: &str = r#"<!DOCTYPE html><html><head><title>dex</title>
<script>if (a < b && c) { document.write("<form>"); }</script></head><body>
<!-- <form action="/not-this"> -->
<div class="theme-panel"><h2 class="theme-heading">Log in to Your Account</h2>
<form method="post" action="/dex/auth/local/login?back=&amp;state=abc%2Fdef">
  <div class="theme-form-row"><div class="theme-form-label"><label for="userid">Email Address</label></div>
    <input tabindex="1" required id="login" name="login" type="text" class="theme-form-input" placeholder="email address"  autofocus />
  </div>
  <div class="theme-form-row"><input tabindex="2" required id="password" name="password" type="password" class="theme-form-input" placeholder="password" >
  </div>
  <input type=hidden name=csrf value='x&#39;y'>
  <button tabindex="3" id="submit-login" type="submit" class="dex-btn theme-btn--primary">Login</button>
</form></div></body></html>"#;

    #[test]
    fn dex_login_form_is_found_with_its_action_and_fields() {
        let forms = forms(DEX_LOGIN);
        assert_eq!(forms.len(), 1, "{forms:?}");
        let form = &forms[0];
        assert_eq!(
            form.action.as_deref(),
            Some("/dex/auth/local/login?back=&state=abc%2Fdef")
        );
        assert!(form.has_password());
        assert_eq!(
            form.credential_fields(),
            ("login".to_owned(), "password".to_owned())
        );
        assert_eq!(form.hidden(), vec![("csrf".to_owned(), "x'y".to_owned())]);
    }

    #[test]
    fn connector_choice_and_approval_pages_are_understood() {
        let choice = r#"<div><a href="/dex/auth/ldap?req=1" class="dex-btn">LDAP</a>
            <a href="/dex/auth/local?req=1&amp;x=2" class="dex-btn">Email</a></div>"#;
        assert_eq!(
            connector_link(choice).as_deref(),
            Some("/dex/auth/local?req=1&x=2")
        );
        let approval = r#"<form method="post"><input type="hidden" name="req" value="r1"/>
            <input type="hidden" name="approval" value="approve"><button type="submit">Grant Access</button></form>
            <form method="post"><input type="hidden" name="req" value="r1"/><input type="hidden" name="approval" value="rejected"></form>"#;
        let forms = forms(approval);
        let chosen: Vec<_> = forms.iter().filter(|f| is_approval(f)).collect();
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].hidden().len(), 2);
    }

    #[test]
    fn session_cookie_lifetime_comes_from_max_age_or_expires() {
        let c = session_cookie(
            "authservice_session=abc; Path=/; HttpOnly",
            "authservice_session",
        )
        .unwrap();
        assert_eq!(c.value.expose(), "abc");
        assert_eq!(c.lifetime, None);
        let c = session_cookie(
            "authservice_session=abc; Max-Age=3600; Path=/",
            "authservice_session",
        )
        .unwrap();
        assert_eq!(c.lifetime, Some(Duration::from_secs(3600)));
        let expires = httpdate_in(7200);
        let c = session_cookie(
            &format!("authservice_session=abc; Expires={expires}"),
            "authservice_session",
        )
        .unwrap();
        let life = c.lifetime.unwrap().as_secs();
        assert!((7100..=7200).contains(&life), "{life}");
        assert!(session_cookie("other=abc", "authservice_session").is_none());
        assert!(session_cookie("authservice_session=; Max-Age=0", "authservice_session").is_none());
        assert!(
            session_cookie("authservice_session=x; Max-Age=0", "authservice_session").is_none()
        );
    }

    fn httpdate_in(seconds: i64) -> String {
        let at = cookie::time::OffsetDateTime::now_utc() + cookie::time::Duration::seconds(seconds);
        let mut c = cookie::Cookie::new("a", "b");
        c.set_expires(at);
        let text = c.to_string();
        text.split("Expires=").nth(1).unwrap().to_owned()
    }

    #[test]
    fn login_redirects_are_told_from_platform_redirects() {
        let up = Url::parse("https://ml.example.com").unwrap();
        assert!(is_login_redirect(
            "/dex/auth?client_id=authservice&state=x",
            &up
        ));
        assert!(is_login_redirect(
            "https://ml.example.com/dex/auth/local?req=1",
            &up
        ));
        assert!(is_login_redirect(
            "https://sso.example.com/oauth2/start?rd=/x",
            &up
        ));
        assert!(is_login_redirect(
            "https://kc.example.com/auth/realms/r/protocol/openid-connect/auth?client_id=a&redirect_uri=b",
            &up
        ));
        assert!(is_login_redirect(
            "https://idp.example.com/authorize?client_id=a&response_type=code",
            &up
        ));
        assert!(!is_login_redirect(
            "/seldon-deploy/api/v1alpha1/namespaces/",
            &up
        ));
        assert!(!is_login_redirect(
            "https://ml.example.com/seldon-deploy/",
            &up
        ));
    }

    #[test]
    fn only_the_session_set_cookie_is_stripped() {
        let mut h = HeaderMap::new();
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("authservice_session=abc; Path=/"),
        );
        h.append(SET_COOKIE, HeaderValue::from_static("csrf=1; Path=/"));
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("authservice_session_x=2"),
        );
        assert_eq!(strip_session_set_cookie(&mut h, "authservice_session"), 1);
        let left: Vec<_> = h
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(left, vec!["csrf=1; Path=/", "authservice_session_x=2"]);
        assert_eq!(strip_session_set_cookie(&mut h, "authservice_session"), 0);
    }

    #[test]
    fn redacted_urls_lose_their_query() {
        let u = Url::parse("https://h/dex/auth/local/login?back=&state=secret#frag").unwrap();
        assert_eq!(redact(&u), "https://h/dex/auth/local/login");
    }

    #[test]
    fn entities_decode() {
        assert_eq!(
            decode_entities("a&amp;b&#47;c&#x2F;d&bogus;e&"),
            "a&b/c/d&bogus;e&"
        );
    }
}
