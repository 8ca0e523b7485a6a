//! Checks the test OpenID provider (tests/idp/keycloak-mock.js) behaves like Keycloak where the proxy relies on it.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::http::{client_with_timeout, send_json};
use common::idp::{jwt_claims, IdpClient, IdpMode, IdpOptions, IdpUser, TestIdp};
use common::proxy::restartable_port;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const CLIENT: &str = "sd-api";
/// Needs form-encoding in HTTP Basic credentials.
const SECRET: &str = "s3:cr t/+%&";
const PUBLIC: &str = "sd-cli";
const REDIRECT: &str = "http://127.0.0.1:9/callback";
/// bob's password grant through the public client.
const BOB_PUBLIC_LOGIN: [(&str, &str); 4] = [
    ("grant_type", "password"),
    ("client_id", PUBLIC),
    ("username", "bob"),
    ("password", "builder"),
];

fn options() -> IdpOptions {
    IdpOptions::default()
        .client(CLIENT, SECRET)
        .public_client(PUBLIC)
        .add_user(
            IdpUser::new("alice", "wonderland")
                .email("alice@example.org")
                .groups(&["admins", "data-science"]),
        )
        .user("bob", "builder")
}

fn http() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(10))
}

/// application/x-www-form-urlencoded encoding, as RFC 6749 asks for client credentials in HTTP Basic.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// POSTs a token request, with HTTP Basic client credentials when `basic` is given.
async fn token(
    idp: &TestIdp,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut request = http().post(&idp.token_endpoint).form(form);
    if let Some((id, secret)) = basic {
        request = request.basic_auth(form_encode(id), Some(form_encode(secret)));
    }
    let response = request.send().await.unwrap();
    (response.status(), response.json().await.unwrap())
}

async fn get_json(url: &str) -> Value {
    let response = http().get(url).send().await.unwrap();
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

fn claims(jwt: &str) -> Value {
    jwt_claims(jwt).expect("a JWT")
}

/// Verifies an RS256 token against the IdP's JWKS and returns its claims.
async fn verified(idp: &TestIdp, jwt: &str, audience: &str) -> Value {
    let jwks: Value = get_json(&idp.jwks_uri).await;
    let kid = jsonwebtoken::decode_header(jwt).unwrap().kid.expect("kid");
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the token's key is in the JWKS");
    let key =
        DecodingKey::from_rsa_components(key["n"].as_str().unwrap(), key["e"].as_str().unwrap())
            .unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[&idp.issuer]);
    jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .unwrap()
        .claims
}

fn assert_error(answer: &(StatusCode, Value), status: StatusCode, error: &str, description: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(
        answer.1,
        json!({ "error": error, "error_description": description })
    );
}

/// Follows the authorize endpoint (no login page) and returns the redirect's query parameters.
async fn authorize(idp: &TestIdp, challenge: &str, nonce: &str) -> Vec<(String, String)> {
    let response = http()
        .get(idp.authorization_endpoint())
        .query(&[
            ("client_id", PUBLIC),
            ("redirect_uri", REDIRECT),
            ("response_type", "code"),
            ("scope", "openid"),
            ("state", "st-1"),
            ("nonce", nonce),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let (target, query) = location.split_once('?').unwrap();
    assert_eq!(target, REDIRECT);
    query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    &params.iter().find(|(k, _)| k == name).unwrap().1
}

#[tokio::test]
async fn discovery_and_jwks_are_at_keycloak_paths() {
    let idp = TestIdp::start(options()).await;
    assert_eq!(
        idp.issuer,
        format!("http://127.0.0.1:{}/auth/realms/test", idp.port)
    );
    let discovery: Value = get_json(&idp.discovery_url()).await;
    let oidc = format!("{}/protocol/openid-connect", idp.issuer);
    assert_eq!(discovery["issuer"], idp.issuer.as_str());
    assert_eq!(discovery["token_endpoint"], format!("{oidc}/token"));
    assert_eq!(discovery["token_endpoint"], idp.token_endpoint.as_str());
    assert_eq!(discovery["jwks_uri"], format!("{oidc}/certs"));
    assert_eq!(discovery["jwks_uri"], idp.jwks_uri.as_str());
    assert_eq!(discovery["authorization_endpoint"], format!("{oidc}/auth"));
    assert_eq!(discovery["userinfo_endpoint"], format!("{oidc}/userinfo"));
    assert_eq!(discovery["end_session_endpoint"], format!("{oidc}/logout"));
    for grant in [
        "authorization_code",
        "client_credentials",
        "password",
        "refresh_token",
    ] {
        assert!(discovery["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!(grant)));
    }
    assert!(discovery["code_challenge_methods_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("S256")));

    let jwks: Value = get_json(&idp.jwks_uri).await;
    let key = &jwks["keys"][0];
    assert_eq!(
        (key["kty"].as_str(), key["alg"].as_str()),
        (Some("RSA"), Some("RS256"))
    );
    assert!(
        key.get("d").is_none(),
        "the JWKS must not leak the private key"
    );

    let other_realm = http()
        .get(format!(
            "{}/auth/realms/nope/.well-known/openid-configuration",
            idp.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(other_realm.status(), StatusCode::NOT_FOUND);
    idp.stop().await;
}

#[tokio::test]
async fn client_credentials_gives_a_signed_access_token_only() {
    let idp = TestIdp::start(options()).await;
    let basic = token(
        &idp,
        Some((CLIENT, SECRET)),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(basic.0, StatusCode::OK, "{}", basic.1);
    let body = basic.1;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 60);
    assert!(
        body.get("refresh_token").is_none() && body.get("id_token").is_none(),
        "{body}"
    );
    let access = verified(&idp, body["access_token"].as_str().unwrap(), CLIENT).await;
    assert_eq!(access["sub"], "service-account-sd-api");
    assert_eq!(access["preferred_username"], "service-account-sd-api");
    assert_eq!(access["azp"], CLIENT);
    assert_eq!(
        access["exp"].as_u64().unwrap() - access["iat"].as_u64().unwrap(),
        60
    );

    // client_secret_post works too
    let post = token(
        &idp,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
        ],
    )
    .await;
    assert_eq!(post.0, StatusCode::OK, "{}", post.1);
    idp.stop().await;

    let idp = TestIdp::start(options().id_token_for_client_credentials(true)).await;
    let (status, body) = token(
        &idp,
        Some((CLIENT, SECRET)),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let id = verified(
        &idp,
        body["id_token"].as_str().expect("an id_token"),
        CLIENT,
    )
    .await;
    assert_eq!(id["sub"], "service-account-sd-api");
    idp.stop().await;
}

#[tokio::test]
async fn bad_client_credentials_are_refused_like_keycloak() {
    let idp = TestIdp::start(options()).await;
    let cc = [("grant_type", "client_credentials")];
    let refused = |answer| {
        assert_error(
            &answer,
            StatusCode::UNAUTHORIZED,
            "unauthorized_client",
            "Invalid client or Invalid client credentials",
        )
    };
    refused(token(&idp, Some((CLIENT, "wrong")), &cc).await);
    refused(token(&idp, Some(("nobody", SECRET)), &cc).await);
    refused(
        token(
            &idp,
            None,
            &[("grant_type", "client_credentials"), ("client_id", CLIENT)],
        )
        .await,
    );
    assert_error(
        &token(
            &idp,
            None,
            &[("grant_type", "client_credentials"), ("client_id", PUBLIC)],
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized_client",
        "Public client not allowed to retrieve service account",
    );
    assert_error(
        &token(
            &idp,
            Some((CLIENT, SECRET)),
            &[("grant_type", "urn:custom")],
        )
        .await,
        StatusCode::BAD_REQUEST,
        "unsupported_grant_type",
        "Unsupported grant_type",
    );

    // a rotated secret: the old one stops working, the new one works
    idp.set_clients(&[IdpClient::confidential(CLIENT, "rotated")])
        .await;
    refused(token(&idp, Some((CLIENT, SECRET)), &cc).await);
    assert_eq!(
        token(&idp, Some((CLIENT, "rotated")), &cc).await.0,
        StatusCode::OK
    );
    idp.stop().await;
}

#[tokio::test]
async fn password_grant_checks_the_user_and_carries_its_claims() {
    let idp = TestIdp::start(options()).await;
    let (status, body) = token(
        &idp,
        Some((CLIENT, SECRET)),
        &[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "wonderland"),
            ("scope", "openid"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["refresh_token"].is_string() && body["refresh_expires_in"].as_u64().unwrap() > 0);
    assert!(body["scope"]
        .as_str()
        .unwrap()
        .split(' ')
        .any(|s| s == "openid"));
    let access = verified(&idp, body["access_token"].as_str().unwrap(), CLIENT).await;
    assert_eq!(access["preferred_username"], "alice");
    assert_eq!(access["email"], "alice@example.org");
    assert_eq!(access["groups"], json!(["admins", "data-science"]));
    assert_eq!(
        access["exp"].as_u64().unwrap() - access["iat"].as_u64().unwrap(),
        60
    );
    assert!(
        access["sub"].as_str().unwrap().len() == 36,
        "a Keycloak-style UUID subject"
    );
    let id = verified(&idp, body["id_token"].as_str().unwrap(), CLIENT).await;
    assert_eq!(id["sub"], access["sub"]);

    let userinfo = send_json(
        http()
            .get(idp.userinfo_endpoint())
            .bearer_auth(body["access_token"].as_str().unwrap()),
    )
    .await;
    assert_eq!(userinfo["preferred_username"], "alice");
    let forged = http()
        .get(idp.userinfo_endpoint())
        .bearer_auth("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);

    // a public client sends its id only; without openid there is no id_token
    let (status, body) = token(&idp, None, &BOB_PUBLIC_LOGIN).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("id_token").is_none());
    assert_eq!(
        claims(body["access_token"].as_str().unwrap())["email"],
        "bob@example.com"
    );

    for (user, password) in [("alice", "wrong"), ("mallory", "wonderland")] {
        assert_error(
            &token(
                &idp,
                Some((CLIENT, SECRET)),
                &[
                    ("grant_type", "password"),
                    ("username", user),
                    ("password", password),
                ],
            )
            .await,
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "Invalid user credentials",
        );
    }
    idp.stop().await;
}

async fn refresh(idp: &TestIdp, refresh_token: &str) -> (StatusCode, Value) {
    token(
        idp,
        None,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", PUBLIC),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

#[tokio::test]
async fn refresh_tokens_rotate_and_belong_to_their_client() {
    let idp = TestIdp::start(options()).await;
    let login = [
        ("grant_type", "password"),
        ("client_id", PUBLIC),
        ("username", "alice"),
        ("password", "wonderland"),
        ("scope", "openid"),
    ];
    let (_, first) = token(&idp, None, &login).await;
    let first_refresh = first["refresh_token"].as_str().unwrap();
    let not_active = |answer| {
        assert_error(
            &answer,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "Token is not active",
        )
    };

    let (status, second) = refresh(&idp, first_refresh).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let second_refresh = second["refresh_token"].as_str().unwrap();
    assert_ne!(second_refresh, first_refresh);
    assert!(
        second["id_token"].is_string(),
        "the original scope had openid"
    );
    assert_eq!(
        claims(second["access_token"].as_str().unwrap())["preferred_username"],
        "alice"
    );

    // the used token is dead; another client cannot use a live one; nor can anyone use garbage
    not_active(refresh(&idp, first_refresh).await);
    not_active(
        token(
            &idp,
            Some((CLIENT, SECRET)),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", second_refresh),
            ],
        )
        .await,
    );
    not_active(refresh(&idp, "garbage").await);

    // an admin signs out every session
    idp.revoke_refresh_tokens().await;
    not_active(refresh(&idp, second_refresh).await);
    idp.stop().await;
}

#[tokio::test]
async fn refresh_tokens_stay_valid_without_rotation() {
    let idp = TestIdp::start(options().rotate_refresh_tokens(false)).await;
    let login = BOB_PUBLIC_LOGIN;
    let (_, first) = token(&idp, None, &login).await;
    let first_refresh = first["refresh_token"].as_str().unwrap();
    assert_eq!(refresh(&idp, first_refresh).await.0, StatusCode::OK);
    let (status, again) = refresh(&idp, first_refresh).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert!(
        again.get("id_token").is_none(),
        "no openid in the original scope"
    );
    idp.stop().await;
}

async fn exchange(idp: &TestIdp, code: &str, verifier: &str) -> (StatusCode, Value) {
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", PUBLIC),
        ("code", code),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier),
    ];
    token(idp, None, &form).await
}

#[tokio::test]
async fn authorization_code_with_pkce_checks_verifier_and_single_use() {
    let idp = TestIdp::start(options()).await;
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier));

    let params = authorize(&idp, &challenge, "n-0S6").await;
    assert_eq!(param(&params, "state"), "st-1");
    let code = param(&params, "code").to_string();
    assert_error(
        &exchange(&idp, &code, "wrong-verifier-wrong-verifier-wrong-verifier").await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
        "PKCE verification failed: Code mismatch",
    );
    // like Keycloak, a failed exchange uses the code up
    assert_error(
        &exchange(&idp, &code, verifier).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
        "Code not valid",
    );

    let code = param(&authorize(&idp, &challenge, "n-0S6").await, "code").to_string();
    let (status, body) = exchange(&idp, &code, verifier).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = verified(&idp, body["id_token"].as_str().unwrap(), PUBLIC).await;
    assert_eq!(id["nonce"], "n-0S6");
    assert_eq!(id["preferred_username"], "alice", "the first user logs in");
    assert!(body["refresh_token"].is_string());
    assert_error(
        &exchange(&idp, &code, verifier).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
        "Code not valid",
    );

    let unknown = http()
        .get(idp.authorization_endpoint())
        .query(&[
            ("client_id", "nobody"),
            ("redirect_uri", REDIRECT),
            ("response_type", "code"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    idp.stop().await;
}

#[tokio::test]
async fn stats_modes_lifetime_and_restart() {
    let mut idp = TestIdp::start(options().port(restartable_port())).await;
    let cc = [("grant_type", "client_credentials")];
    token(&idp, Some((CLIENT, SECRET)), &cc).await;
    token(&idp, Some((CLIENT, "wrong")), &cc).await;
    token(&idp, None, &BOB_PUBLIC_LOGIN).await;
    let stats = idp.stats().await;
    assert_eq!(
        (
            stats.ok("client_credentials"),
            stats.errors("client_credentials")
        ),
        (1, 1)
    );
    assert_eq!(stats.token_requests("password"), 1);
    assert_eq!(stats.total, 3);
    idp.reset_stats().await;
    assert_eq!(idp.total_token_requests().await, 0);

    idp.set_mode(IdpMode::Fail503).await;
    assert_error(
        &token(&idp, Some((CLIENT, SECRET)), &cc).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "Service Unavailable (simulated)",
    );
    idp.set_mode(IdpMode::Hang).await;
    let hung = http()
        .post(&idp.token_endpoint)
        .timeout(Duration::from_millis(500))
        .form(&cc)
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
    idp.set_mode(IdpMode::Normal).await;
    idp.set_lifetime(5).await;
    let (status, body) = token(&idp, Some((CLIENT, SECRET)), &cc).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["expires_in"], 5);
    let access = claims(body["access_token"].as_str().unwrap());
    assert_eq!(
        access["exp"].as_u64().unwrap() - access["iat"].as_u64().unwrap(),
        5
    );
    let stats = idp.stats().await;
    assert_eq!(
        (
            stats.ok("client_credentials"),
            stats.errors("client_credentials")
        ),
        (1, 2)
    );
    assert_eq!(idp.token_requests("client_credentials").await, 3);

    // the same port after a restart; everything but the options is new
    let port = idp.port;
    idp.restart().await;
    assert_eq!(idp.port, port);
    assert_eq!(idp.total_token_requests().await, 0);
    assert_eq!(
        token(&idp, Some((CLIENT, SECRET)), &cc).await.0,
        StatusCode::OK
    );
    idp.stop().await;
}
