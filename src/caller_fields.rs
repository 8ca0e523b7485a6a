//! The caller's header fields the proxy reads, found in one pass over the request head
//! instead of one hash lookup each: a request carries a handful of fields, and comparing
//! their names costs less than hashing the five names looked for.

use http::{HeaderMap, HeaderValue};

/// The first value of each field the guard and the forwarder read.
#[derive(Default)]
pub struct CallerFields<'a> {
    pub host: Option<&'a HeaderValue>,
    pub origin: Option<&'a HeaderValue>,
    pub sec_fetch_site: Option<&'a HeaderValue>,
    pub authorization: Option<&'a HeaderValue>,
    pub request_id: Option<&'a HeaderValue>,
    /// Whether the caller sent a `Connection` field (it may name more fields to drop).
    pub connection: bool,
    /// Whether `Host` came more than once (RFC 9112 3.2: such a request is answered 400).
    pub repeated_host: bool,
}

impl<'a> CallerFields<'a> {
    pub fn of(headers: &'a HeaderMap) -> CallerFields<'a> {
        let mut found = CallerFields::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                "host" => {
                    found.repeated_host |= found.host.is_some();
                    &mut found.host
                }
                "origin" => &mut found.origin,
                "sec-fetch-site" => &mut found.sec_fetch_site,
                "authorization" => &mut found.authorization,
                "x-request-id" => &mut found.request_id,
                "connection" => {
                    found.connection = true;
                    continue;
                }
                _ => continue,
            };
            // A map yields a name's values one after another, the first first: the first
            // one found is the one `HeaderMap::get` gives.
            slot.get_or_insert(value);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_is_its_first_value_as_get_gives_it() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-request-id", "first"),
            ("accept", "*/*"),
            ("host", "localhost:8080"),
            ("x-request-id", "second"),
            ("origin", "http://localhost:3000"),
            ("sec-fetch-site", "same-origin"),
            ("authorization", "Bearer abc"),
            ("connection", "keep-alive"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        let fields = CallerFields::of(&headers);
        for (found, name) in [
            (fields.host, "host"),
            (fields.origin, "origin"),
            (fields.sec_fetch_site, "sec-fetch-site"),
            (fields.authorization, "authorization"),
            (fields.request_id, "x-request-id"),
        ] {
            assert_eq!(found, headers.get(name), "{name}");
        }
        assert_eq!(fields.request_id.unwrap(), "first");
        assert!(fields.connection);
        assert!(!fields.repeated_host);
        headers.append("host", HeaderValue::from_static("elsewhere.example"));
        assert!(CallerFields::of(&headers).repeated_host);

        let empty = HeaderMap::new();
        let none = CallerFields::of(&empty);
        assert!(none.host.is_none() && none.request_id.is_none() && !none.connection);
    }
}
