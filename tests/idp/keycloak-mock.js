// Keycloak-like OpenID provider for the seldon-auth-proxy integration tests, built on npm's oauth2-mock-server.
//
// Usage: node keycloak-mock.js '<JSON config>'   (or the JSON in env KEYCLOAK_MOCK_CONFIG; the argument wins)
// Config keys, all optional (the server always binds 127.0.0.1):
//   port                         0 = ephemeral (default); give the old port to restart on it
//   realm                        "test"
//   clients                      [{"id": "sd-api", "secret": "s3cret"}, {"id": "cli"}]  (no secret = public client)
//   users                        [{"username": "alice", "password": "pw", "email": "a@x.io", "groups": ["admins"]}]
//                                (the first user is the one "logged in" by the authorize endpoint unless login_hint names another)
//   tokenLifetimeSeconds         60     access/id token lifetime (exp = iat + this)
//   refreshTokenLifetimeSeconds  1800   refresh token lifetime (refresh_expires_in)
//   idTokenForClientCredentials  false  newer Keycloak returns no id_token for client_credentials
//   rotateRefreshTokens          true   a refresh token is refused once it has been used
//   mode                         "normal"  the token endpoint's mode from the start (see /__control/mode), e.g. an IdP
//                                          restarted as "fail503" so its start-up time does not decide when it is back
//   exitOnStdinEnd               true   exit when stdin closes, so a dead test never leaves this running
// When listening it prints ONE line to stdout, {"issuer","port","jwks_uri","token_endpoint"}; all logs go to stderr.
// It exits on SIGTERM/SIGINT and when stdin ends.
//
// Keycloak endpoints under ISSUER = http://127.0.0.1:PORT/auth/realms/REALM:
//   /.well-known/openid-configuration, /protocol/openid-connect/{token,certs,auth,userinfo,logout,revoke,token/introspect}
// Test control endpoints (JSON bodies):
//   GET  /__control/stats                 {"token_requests":{"<grant_type>":{"ok":N,"error":N}},"total":N}
//   POST /__control/reset-stats
//   POST /__control/mode                  {"mode":"normal"|"fail503"|"hang"}   (applies to the token endpoint only)
//   POST /__control/revoke-refresh-tokens
//   POST /__control/lifetime              {"seconds":N}
//   POST /__control/users                 [user, ...]     replaces the users
//   POST /__control/clients               [client, ...]   replaces the clients (e.g. to rotate a secret)
//
// The library serves discovery, JWKS, authorize, userinfo and logout (customised through its service events) and signs
// every token with its RS256 keystore. The token, revoke and introspect endpoints are answered here because the
// library's token endpoint accepts anything and reports errors as RFC 9110 problem documents before any hook runs.

import { createServer } from 'node:http';
import { createHash, randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';

const log = (...args) => console.error('[keycloak-mock]', ...args);

const config = {
  port: 0,
  realm: 'test',
  clients: [],
  users: [],
  tokenLifetimeSeconds: 60,
  refreshTokenLifetimeSeconds: 1800,
  idTokenForClientCredentials: false,
  rotateRefreshTokens: true,
  mode: 'normal',
  exitOnStdinEnd: true,
  ...JSON.parse(process.argv[2] ?? process.env.KEYCLOAK_MOCK_CONFIG ?? '{}'),
};

const state = {
  clients: checkClients(config.clients),
  users: checkUsers(config.users),
  lifetime: checkSeconds(config.tokenLifetimeSeconds),
  mode: checkMode(config.mode),
  refreshLifetime: checkSeconds(config.refreshTokenLifetimeSeconds),
  stats: {}, // grant_type -> { ok, error }
  refreshTokens: new Map(), // token -> { payload, clientId, username }
  accessTokens: new Map(), // token -> payload (for userinfo and introspection)
  codes: new Map(), // authorization code -> what the authorize request asked for
};

const realmPath = `/auth/realms/${encodeURIComponent(config.realm)}`;
const oidc = '/protocol/openid-connect';
// Paths relative to the issuer: the front handler strips realmPath before handing a request to the library.
const endpoints = {
  wellKnownDocument: '/.well-known/openid-configuration',
  token: `${oidc}/token`,
  jwks: `${oidc}/certs`,
  authorize: `${oidc}/auth`,
  userinfo: `${oidc}/userinfo`,
  endSession: `${oidc}/logout`,
  revoke: `${oidc}/revoke`,
  introspect: `${oidc}/token/introspect`,
};

const issuer = new OAuth2Issuer(false);
const service = new OAuth2Service(issuer, endpoints);

class OAuthError extends Error {
  constructor(status, error, description) {
    super(description);
    this.status = status;
    this.body = { error, error_description: description };
  }
}
const invalidGrant = (description) => new OAuthError(400, 'invalid_grant', description);

// ---------- validation of configuration and control input ----------

function checkClients(clients) {
  const ok = (c) => typeof c?.id === 'string' && (c.secret == null || typeof c.secret === 'string');
  if (!Array.isArray(clients) || !clients.every(ok)) {
    throw new Error('clients must be a list of {id: string, secret?: string}');
  }
  return clients;
}

function checkUsers(users) {
  const ok = (u) => typeof u?.username === 'string' && typeof u.password === 'string' && (u.groups ?? []).every((g) => typeof g === 'string');
  if (!Array.isArray(users) || !users.every(ok)) throw new Error('users must be a list of {username, password, email?, groups?}');
  return users;
}

function checkMode(mode) {
  if (!['normal', 'fail503', 'hang'].includes(mode)) throw new Error('mode must be normal, fail503 or hang');
  return mode;
}

function checkSeconds(n) {
  if (!Number.isInteger(n) || n <= 0) throw new Error('a lifetime must be a positive whole number of seconds');
  return n;
}

// ---------- helpers ----------

const nowSeconds = () => Math.floor(Date.now() / 1000);
const jwtPayload = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString('utf8'));

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text), 'Cache-Control': 'no-store' });
  res.end(text);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

function formDecode(text) {
  try {
    return decodeURIComponent(text.replace(/\+/g, ' '));
  } catch {
    return text;
  }
}

function findUser(name) {
  const wanted = String(name ?? '').toLowerCase();
  return state.users.find((u) => u.username.toLowerCase() === wanted || u.email?.toLowerCase() === wanted);
}

// Keycloak user ids are UUIDs; derive a stable one from realm and username.
function userId(username) {
  const h = createHash('sha256').update(`${config.realm}/${username}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-a${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

// Keycloak always adds its default client scopes; openid stays only when asked for.
function grantedScope(requested) {
  const asked = String(requested ?? '').split(' ').filter(Boolean);
  return [...new Set([...asked, 'profile', 'email'])].join(' ');
}
const hasOpenid = (scope) => scope.split(' ').includes('openid');

// HTTP Basic (form-url-decoded, as Keycloak does) or client_id/client_secret in the form.
function authenticateClient(req, form) {
  let id = form.get('client_id');
  let secret = form.get('client_secret');
  const basic = /^Basic\s+(\S+)$/i.exec(req.headers.authorization ?? '');
  if (basic) {
    const decoded = Buffer.from(basic[1], 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon >= 0) [id, secret] = [formDecode(decoded.slice(0, colon)), formDecode(decoded.slice(colon + 1))];
  }
  const client = state.clients.find((c) => c.id === id);
  if (!client || (client.secret != null && client.secret !== secret)) {
    throw new OAuthError(401, 'unauthorized_client', 'Invalid client or Invalid client credentials');
  }
  return client;
}

// ---------- token issuing ----------

function sign(claims, lifetime) {
  return issuer.buildToken({
    expiresIn: lifetime,
    scopesOrTransform: (_header, payload) => {
      Object.assign(payload, claims);
      delete payload.nbf; // Keycloak sets none
    },
  });
}

function subjectClaims(client, user) {
  if (!user) {
    const name = `service-account-${client.id}`;
    return { sub: name, preferred_username: name, email_verified: false, groups: [], clientId: client.id };
  }
  return {
    sub: userId(user.username),
    preferred_username: user.username,
    email: user.email ?? `${user.username}@example.com`,
    email_verified: true,
    groups: user.groups ?? [],
  };
}

async function issueTokens({ client, user, scope, sid = randomUUID(), nonce, withRefresh, withIdToken }) {
  const lifetime = state.lifetime;
  const refreshLifetime = state.refreshLifetime;
  const subject = subjectClaims(client, user);
  const common = { ...subject, azp: client.id, sid };
  const accessToken = await sign({ ...common, jti: randomUUID(), typ: 'Bearer', aud: client.id, scope }, lifetime);
  state.accessTokens.set(accessToken, jwtPayload(accessToken));
  const body = { access_token: accessToken, expires_in: lifetime, refresh_expires_in: withRefresh ? refreshLifetime : 0 };
  if (withRefresh) {
    const claims = { jti: randomUUID(), typ: 'Refresh', aud: issuer.url, sub: subject.sub, azp: client.id, sid, scope };
    const refreshToken = await sign(claims, refreshLifetime);
    state.refreshTokens.set(refreshToken, { payload: jwtPayload(refreshToken), clientId: client.id, username: user.username });
    body.refresh_token = refreshToken;
  }
  body.token_type = 'Bearer';
  if (withIdToken) {
    body.id_token = await sign({ ...common, jti: randomUUID(), typ: 'ID', aud: client.id, ...(nonce ? { nonce } : {}) }, lifetime);
  }
  Object.assign(body, { 'not-before-policy': 0, session_state: sid, scope });
  return body;
}

const grants = {
  async client_credentials(form, client) {
    if (client.secret == null) throw new OAuthError(401, 'unauthorized_client', 'Public client not allowed to retrieve service account');
    const scope = grantedScope(form.get('scope'));
    return issueTokens({ client, scope, withRefresh: false, withIdToken: config.idTokenForClientCredentials });
  },

  async password(form, client) {
    const user = findUser(form.get('username'));
    if (!user || user.password !== form.get('password')) throw new OAuthError(401, 'invalid_grant', 'Invalid user credentials');
    const scope = grantedScope(form.get('scope'));
    return issueTokens({ client, user, scope, withRefresh: true, withIdToken: hasOpenid(scope) });
  },

  async refresh_token(form, client) {
    const token = form.get('refresh_token') ?? '';
    const entry = state.refreshTokens.get(token);
    const user = entry && findUser(entry.username);
    if (!entry || entry.payload.exp <= nowSeconds() || entry.clientId !== client.id || !user) throw invalidGrant('Token is not active');
    if (config.rotateRefreshTokens) state.refreshTokens.delete(token);
    const scope = form.get('scope') ? grantedScope(form.get('scope')) : entry.payload.scope;
    return issueTokens({ client, user, scope, sid: entry.payload.sid, withRefresh: true, withIdToken: hasOpenid(scope) });
  },

  async authorization_code(form, client) {
    const code = form.get('code') ?? '';
    const entry = state.codes.get(code);
    state.codes.delete(code); // single use, even when this exchange fails (as in Keycloak)
    if (!entry || entry.exp <= nowSeconds()) throw invalidGrant('Code not valid');
    if (entry.clientId !== client.id) throw invalidGrant('Auth error');
    if (form.get('redirect_uri') !== entry.redirectUri) throw invalidGrant('Incorrect redirect_uri');
    const verifier = form.get('code_verifier');
    if (entry.challenge) {
      if (!verifier) throw invalidGrant('PKCE code verifier not specified');
      if (!/^[A-Za-z0-9\-._~]{43,128}$/.test(verifier)) throw invalidGrant('PKCE invalid code verifier');
      const derived = entry.method === 'S256' ? createHash('sha256').update(verifier).digest('base64url') : verifier;
      if (derived !== entry.challenge) throw invalidGrant('PKCE verification failed: Code mismatch');
    } else if (verifier) {
      throw invalidGrant('PKCE code verifier specified but challenge not present in authorization');
    }
    const user = findUser(entry.username);
    if (!user) throw invalidGrant('User not found');
    const { scope, nonce } = entry;
    return issueTokens({ client, user, scope, nonce, withRefresh: true, withIdToken: hasOpenid(scope) });
  },
};

function count(grant, outcome) {
  state.stats[grant] ??= { ok: 0, error: 0 };
  state.stats[grant][outcome] += 1;
}

async function tokenEndpoint(req, res) {
  const form = new URLSearchParams(await readBody(req));
  const grant = form.get('grant_type') ?? '(missing)';
  if (state.mode === 'hang') {
    count(grant, 'error');
    log(`token ${grant}: hanging (mode hang)`);
    return; // the request is never answered
  }
  if (state.mode === 'fail503') {
    count(grant, 'error');
    return sendJson(res, 503, { error: 'temporarily_unavailable', error_description: 'Service Unavailable (simulated)' });
  }
  try {
    if (!form.has('grant_type')) throw new OAuthError(400, 'invalid_request', 'Missing form parameter: grant_type');
    if (!Object.hasOwn(grants, grant)) throw new OAuthError(400, 'unsupported_grant_type', 'Unsupported grant_type');
    const client = authenticateClient(req, form);
    const body = await grants[grant](form, client);
    count(grant, 'ok');
    log(`token ${grant} client=${client.id}: ok`);
    sendJson(res, 200, body);
  } catch (err) {
    if (!(err instanceof OAuthError)) throw err;
    count(grant, 'error');
    log(`token ${grant}: ${err.status} ${err.body.error} (${err.body.error_description})`);
    sendJson(res, err.status, err.body);
  }
}

async function revokeEndpoint(req, res) {
  const form = new URLSearchParams(await readBody(req));
  try {
    const client = authenticateClient(req, form);
    const token = form.get('token') ?? '';
    if (state.refreshTokens.get(token)?.clientId === client.id) state.refreshTokens.delete(token);
    if (state.accessTokens.get(token)?.azp === client.id) state.accessTokens.delete(token);
    res.writeHead(200).end();
  } catch (err) {
    if (!(err instanceof OAuthError)) throw err;
    sendJson(res, err.status, err.body);
  }
}

async function introspectEndpoint(req, res) {
  const form = new URLSearchParams(await readBody(req));
  try {
    authenticateClient(req, form);
    const token = form.get('token') ?? '';
    const payload = state.accessTokens.get(token) ?? state.refreshTokens.get(token)?.payload;
    const active = payload !== undefined && payload.exp > nowSeconds();
    sendJson(res, 200, active ? { ...payload, client_id: payload.azp, username: payload.preferred_username, active } : { active });
  } catch (err) {
    if (!(err instanceof OAuthError)) throw err;
    sendJson(res, err.status, err.body);
  }
}

// ---------- library hooks ----------

service.on('beforeWellKnownOpenIdConfiguration', ({ body }) => {
  Object.assign(body, {
    grant_types_supported: ['authorization_code', 'client_credentials', 'password', 'refresh_token'],
    token_endpoint_auth_methods_supported: ['client_secret_basic', 'client_secret_post'],
    code_challenge_methods_supported: ['plain', 'S256'],
    scopes_supported: ['openid', 'profile', 'email'],
    claims_supported: ['sub', 'iss', 'aud', 'exp', 'iat', 'azp', 'nonce', 'preferred_username', 'email', 'email_verified', 'groups'],
  });
});

// The library has just made a code and will redirect to redirect_uri with it: remember what it was issued for.
service.on('beforeAuthorizeRedirect', ({ url }, req) => {
  const code = url.searchParams.get('code');
  if (!code) return;
  const q = req.query;
  const user = (q.login_hint && findUser(q.login_hint)) || state.users[0];
  state.codes.set(code, {
    clientId: q.client_id,
    redirectUri: q.redirect_uri,
    challenge: q.code_challenge,
    method: q.code_challenge_method ?? 'plain',
    nonce: q.nonce,
    scope: grantedScope(q.scope),
    username: user.username,
    exp: nowSeconds() + 60,
  });
  url.searchParams.set('session_state', randomUUID());
  url.searchParams.set('iss', issuer.url);
});

service.on('beforeUserinfo', (response, req) => {
  const token = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '')?.[1];
  const claims = token && state.accessTokens.get(token);
  if (!claims || claims.exp <= nowSeconds()) {
    response.statusCode = 401;
    response.body = { error: 'invalid_token', error_description: 'Token verification failed' };
    return;
  }
  const { sub, preferred_username, email, email_verified, groups } = claims;
  response.body = { sub, preferred_username, email, email_verified, groups };
});

// Checks the library's authorize endpoint does not do: a known client and someone to log in.
function authorizeAllowed(url, res) {
  const clientId = url.searchParams.get('client_id');
  let problem;
  if (!state.clients.some((c) => c.id === clientId)) problem = 'Client not found.';
  else if (!url.searchParams.get('redirect_uri')) problem = 'Invalid parameter: redirect_uri';
  else if (state.users.length === 0) problem = 'No user configured to log in.';
  if (problem) {
    res.writeHead(400, { 'Content-Type': 'text/plain' }).end(problem);
    return false;
  }
  return true;
}

// ---------- test control ----------

async function control(req, res, path) {
  const text = req.method === 'POST' ? await readBody(req) : '';
  let body;
  try {
    body = text ? JSON.parse(text) : {};
    switch (`${req.method} ${path}`) {
      case 'GET /__control/stats': {
        const total = Object.values(state.stats).reduce((n, s) => n + s.ok + s.error, 0);
        return sendJson(res, 200, { token_requests: state.stats, total });
      }
      case 'POST /__control/reset-stats':
        state.stats = {};
        break;
      case 'POST /__control/mode':
        state.mode = checkMode(body.mode);
        break;
      case 'POST /__control/revoke-refresh-tokens':
        state.refreshTokens.clear();
        break;
      case 'POST /__control/lifetime':
        state.lifetime = checkSeconds(body.seconds);
        break;
      case 'POST /__control/users':
        state.users = checkUsers(body);
        break;
      case 'POST /__control/clients':
        state.clients = checkClients(body);
        break;
      default:
        return sendJson(res, 404, { error: `no control endpoint ${req.method} ${path}` });
    }
  } catch (err) {
    return sendJson(res, 400, { error: err.message });
  }
  log(`control ${path}`);
  sendJson(res, 200, { ok: true });
}

// ---------- server ----------

async function handle(req, res) {
  const url = new URL(req.url ?? '/', 'http://127.0.0.1');
  if (url.pathname.startsWith('/__control/')) return control(req, res, url.pathname);
  if (!url.pathname.startsWith(`${realmPath}/`)) return sendJson(res, 404, { error: 'Realm does not exist' });
  const path = url.pathname.slice(realmPath.length).replace(/(.)\/$/, '$1');
  if (req.method === 'POST' && path === endpoints.token) return tokenEndpoint(req, res);
  if (req.method === 'POST' && path === endpoints.revoke) return revokeEndpoint(req, res);
  if (req.method === 'POST' && path === endpoints.introspect) return introspectEndpoint(req, res);
  if (req.method === 'GET' && path === endpoints.authorize && !authorizeAllowed(url, res)) return;
  req.url = path + url.search; // the library's routes are relative to the issuer
  service.requestHandler(req, res);
}

const server = createServer((req, res) => {
  handle(req, res).catch((err) => {
    log('internal error:', err);
    if (!res.headersSent) sendJson(res, 500, { error: 'server_error', error_description: String(err.message) });
  });
});

function shutdown(why) {
  log(`exiting: ${why}`);
  server.close();
  process.exit(0);
}

try {
  await issuer.keys.generate('RS256');
  server.listen(config.port, '127.0.0.1');
  await once(server, 'listening');
} catch (err) {
  log(`cannot start: ${err.message}`);
  process.exit(1);
}
const { port } = server.address();
issuer.url = `http://127.0.0.1:${port}${realmPath}`;
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (config.exitOnStdinEnd) {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('close', () => shutdown('stdin closed'));
  process.stdin.resume();
}
const announce = { issuer: issuer.url, port, jwks_uri: issuer.url + endpoints.jwks, token_endpoint: issuer.url + endpoints.token };
process.stdout.write(`${JSON.stringify(announce)}\n`);
log(`listening: realm=${config.realm} clients=${state.clients.length} users=${state.users.length}`);
