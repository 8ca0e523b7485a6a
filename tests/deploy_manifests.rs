//! Static checks of the Kubernetes manifests in `deploy/` (no cluster needed):
//! the proxy runs as a native sidecar, stays on loopback, is probed on the
//! admin port, is locked down, reads its secret from a mounted file, and the
//! kustomization only names files that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_norway::Value;

/// Name of the proxy's container in every pod template.
const PROXY: &str = "seldon-auth-proxy";
const ADMIN_PORT: u64 = 9090;
const PROXY_PORT: u64 = 8080;
const ENV_PREFIX: &str = "SELDON_AUTH_PROXY_";
const NONROOT_UID: u64 = 65532;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// One YAML document and the file it came from.
struct Doc {
    file: PathBuf,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn what(&self) -> String {
        format!("{} {} ({})", self.kind(), self.name(), rel(&self.file))
    }
}

fn rel(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(p)
        .display()
        .to_string()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    out
}

/// Every non-empty YAML document of every file under deploy/, recursively.
fn load_docs() -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in yaml_files(&deploy_dir()) {
        let text = std::fs::read_to_string(&file).expect("read yaml");
        for de in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", rel(&file)));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    assert!(!docs.is_empty(), "no YAML documents under deploy/");
    docs
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(|s| s.as_slice()).unwrap_or(&[])
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A pod template found in a workload document.
struct Workload<'a> {
    doc: &'a Doc,
    /// The pod template (has `metadata` and `spec`).
    template: &'a Value,
}

impl Workload<'_> {
    fn spec(&self) -> &Value {
        &self.template["spec"]
    }
    fn init_containers(&self) -> &[Value] {
        seq(&self.spec()["initContainers"])
    }
    fn containers(&self) -> &[Value] {
        seq(&self.spec()["containers"])
    }
    fn is_proxy(c: &Value) -> bool {
        s(&c["name"]) == PROXY || s(&c["image"]).contains(PROXY)
    }
    fn proxy(&self) -> &Value {
        let found: Vec<_> = self
            .init_containers()
            .iter()
            .chain(self.containers())
            .filter(|c| Self::is_proxy(c))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: expected exactly one {PROXY} container",
            self.doc.what()
        );
        found[0]
    }
    fn apps(&self) -> Vec<&Value> {
        self.containers()
            .iter()
            .filter(|c| !Self::is_proxy(c))
            .collect()
    }
    fn volume(&self, name: &str) -> &Value {
        seq(&self.spec()["volumes"])
            .iter()
            .find(|v| s(&v["name"]) == name)
            .unwrap_or_else(|| panic!("{}: no volume named {name}", self.doc.what()))
    }
}

fn workloads(docs: &[Doc]) -> Vec<Workload<'_>> {
    let mut out = Vec::new();
    for doc in docs {
        let v = &doc.value;
        let template = match doc.kind() {
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                &v["spec"]["template"]
            }
            "CronJob" => &v["spec"]["jobTemplate"]["spec"]["template"],
            "Pod" => v,
            _ => continue,
        };
        out.push(Workload { doc, template });
    }
    out
}

fn find_doc<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Option<&'a Doc> {
    docs.iter().find(|d| d.kind() == kind && d.name() == name)
}

/// The TOML file given to the proxy with `--config`, resolved through the
/// volume mount to a ConfigMap in deploy/. Empty when there is no `--config`.
fn proxy_config_file(w: &Workload, docs: &[Doc]) -> toml::Table {
    let proxy = w.proxy();
    let Some(path) = arg_value(proxy, "--config") else {
        return toml::Table::new();
    };
    let (volume, key) = mounted_file(w, proxy, &path);
    let cm_name = s(&volume["configMap"]["name"]);
    assert!(
        !cm_name.is_empty(),
        "{}: --config {path} must come from a ConfigMap volume",
        w.doc.what()
    );
    let cm = find_doc(docs, "ConfigMap", cm_name)
        .unwrap_or_else(|| panic!("{}: ConfigMap {cm_name} is not in deploy/", w.doc.what()));
    let text = cm.value["data"][key.as_str()]
        .as_str()
        .unwrap_or_else(|| panic!("{}: has no data key {key:?} for --config", cm.what()));
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{}: {key} is not valid TOML: {e}", cm.what()))
}

/// The value of `--flag value` or `--flag=value` in the container's args.
fn arg_value(c: &Value, flag: &str) -> Option<String> {
    let args: Vec<&str> = seq(&c["command"])
        .iter()
        .chain(seq(&c["args"]))
        .map(s)
        .collect();
    for (i, a) in args.iter().enumerate() {
        if *a == flag {
            return args.get(i + 1).map(|v| v.to_string());
        }
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            return Some(v.to_string());
        }
    }
    None
}

/// Whether a bare `--flag` (a boolean switch) is among the container's args.
fn has_flag(c: &Value, flag: &str) -> bool {
    seq(&c["args"])
        .iter()
        .chain(seq(&c["command"]))
        .any(|a| s(a) == flag)
}

fn env_entry<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    seq(&c["env"]).iter().find(|e| s(&e["name"]) == name)
}

/// A setting's effective value for the proxy: flag > env > config file.
/// Settings set through `valueFrom` cannot be checked statically and fail.
fn setting(w: &Workload, config: &toml::Table, key: &str) -> Option<String> {
    let proxy = w.proxy();
    let flag = format!("--{}", key.replace('_', "-"));
    if let Some(v) = arg_value(proxy, &flag) {
        return Some(v);
    }
    if has_flag(proxy, &flag) {
        return Some("true".into());
    }
    let env = format!("{ENV_PREFIX}{}", key.to_uppercase());
    if let Some(e) = env_entry(proxy, &env) {
        assert!(
            e.get("valueFrom").is_none(),
            "{}: {env} must be a literal value so it can be checked",
            w.doc.what()
        );
        return Some(s(&e["value"]).to_string());
    }
    config.get(key).map(|v| match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// The volume mounted (in container `c`) at a directory containing `path`,
/// and the file's key inside that volume.
fn mounted_file<'a>(w: &'a Workload, c: &Value, path: &str) -> (&'a Value, String) {
    let mount = seq(&c["volumeMounts"])
        .iter()
        .filter(|m| {
            let mp = s(&m["mountPath"]).trim_end_matches('/');
            path.strip_prefix(mp).is_some_and(|r| r.starts_with('/'))
        })
        .max_by_key(|m| s(&m["mountPath"]).len())
        .unwrap_or_else(|| panic!("{}: nothing is mounted at {path}", w.doc.what()));
    assert_eq!(
        mount["readOnly"].as_bool(),
        Some(true),
        "{}: mount of {path} must be readOnly",
        w.doc.what()
    );
    assert!(
        mount.get("subPath").is_none(),
        "{}: {path} is mounted with subPath, which never sees updates",
        w.doc.what()
    );
    let rel_path = path[s(&mount["mountPath"]).trim_end_matches('/').len() + 1..].to_string();
    let volume = w.volume(s(&mount["name"]));
    // With `items`, the file name maps back to a key; without, it is the key.
    let source = if volume.get("secret").is_some() {
        &volume["secret"]
    } else {
        &volume["configMap"]
    };
    let key = match source.get("items") {
        Some(items) => seq(items)
            .iter()
            .find(|i| s(&i["path"]) == rel_path)
            .map(|i| s(&i["key"]).to_string())
            .unwrap_or_else(|| panic!("{}: no volume item provides {path}", w.doc.what())),
        None => rel_path,
    };
    (volume, key)
}

fn is_loopback(addr: &str) -> bool {
    if addr.starts_with("unix:") {
        return true;
    }
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return sa.ip().is_loopback();
    }
    matches!(addr.rsplit_once(':'), Some(("localhost", _)))
}

fn port_of(addr: &str) -> Option<u64> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// A probe's or Service's port (number or container port name) as a number.
fn resolve_port(c: &Value, port: &Value) -> Option<u64> {
    if let Some(n) = port.as_u64() {
        return Some(n);
    }
    let name = port.as_str()?;
    seq(&c["ports"])
        .iter()
        .find(|p| s(&p["name"]) == name)
        .and_then(|p| p["containerPort"].as_u64())
}

/// Durations as the proxy writes them: "500ms", "10s", "2m", "1h".
fn parse_duration(text: &str) -> Duration {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .unwrap_or_else(|_| panic!("bad duration {text:?}"));
    match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("bad duration unit in {text:?}"),
    }
}

/// Kubernetes memory quantity in bytes (binary and decimal suffixes).
fn parse_bytes(q: &str) -> u64 {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: u64 = num.parse().unwrap_or_else(|_| panic!("bad quantity {q:?}"));
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => panic!("unsupported quantity {q:?}"),
    }
}

fn proxy_workloads(docs: &[Doc]) -> Vec<Workload<'_>> {
    let ws: Vec<_> = workloads(docs)
        .into_iter()
        .filter(|w| {
            w.init_containers()
                .iter()
                .chain(w.containers())
                .any(Workload::is_proxy)
        })
        .collect();
    let kinds: BTreeSet<_> = ws.iter().map(|w| w.doc.kind()).collect();
    assert!(
        kinds.contains("Deployment") && kinds.contains("Job"),
        "expected a Deployment and a Job running the proxy, found {kinds:?}"
    );
    ws
}

#[test]
fn every_document_is_well_formed_and_commented() {
    let docs = load_docs();
    let mut seen = BTreeSet::new();
    for d in &docs {
        assert!(
            !s(&d.value["apiVersion"]).is_empty(),
            "{}: no apiVersion",
            d.what()
        );
        assert!(!d.kind().is_empty(), "{}: no kind", rel(&d.file));
        if d.kind() != "Kustomization" {
            assert!(!d.name().is_empty(), "{}: no metadata.name", d.what());
            assert!(
                seen.insert((d.kind().to_string(), d.name().to_string())),
                "{}: duplicate resource",
                d.what()
            );
        }
    }
    for file in yaml_files(&deploy_dir()) {
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(
            text.starts_with('#'),
            "{}: must open with a comment saying what it is for",
            rel(&file)
        );
    }
}

#[test]
fn proxy_is_a_native_sidecar() {
    let docs = load_docs();
    for w in proxy_workloads(&docs) {
        let what = w.doc.what();
        let proxy = w.proxy();
        assert!(
            w.init_containers().iter().any(|c| std::ptr::eq(c, proxy)),
            "{what}: the proxy must be an initContainers entry (native sidecar)"
        );
        assert_eq!(
            s(&proxy["restartPolicy"]),
            "Always",
            "{what}: the proxy init container needs restartPolicy: Always"
        );
        assert!(
            !w.apps().is_empty(),
            "{what}: no app container next to the proxy"
        );
        let image = s(&proxy["image"]);
        assert!(
            image.contains('@') || image.rsplit('/').next().is_some_and(|i| i.contains(':')),
            "{what}: proxy image {image:?} needs a tag or digest"
        );
        assert!(!image.ends_with(":latest"), "{what}: do not deploy :latest");
        if w.doc.kind() == "Job" || w.doc.kind() == "CronJob" {
            let rp = s(&w.spec()["restartPolicy"]);
            assert!(
                rp == "Never" || rp == "OnFailure",
                "{what}: a Job pod's restartPolicy must be Never or OnFailure"
            );
        }
    }
}

#[test]
fn probes_hit_the_admin_port() {
    let docs = load_docs();
    for w in proxy_workloads(&docs) {
        let what = w.doc.what();
        let proxy = w.proxy();
        for (probe, path) in [
            ("startupProbe", "/readyz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            let get = &proxy[probe]["httpGet"];
            assert_eq!(s(&get["path"]), path, "{what}: {probe} must GET {path}");
            assert_eq!(
                resolve_port(proxy, &get["port"]),
                Some(ADMIN_PORT),
                "{what}: {probe} must target the admin port {ADMIN_PORT}"
            );
        }
        let config = proxy_config_file(&w, &docs);
        let admin = setting(&w, &config, "admin_listen")
            .unwrap_or_else(|| panic!("{what}: admin_listen must be set (default is loopback)"));
        assert_eq!(
            port_of(&admin),
            Some(ADMIN_PORT),
            "{what}: admin_listen {admin}"
        );
        assert!(
            !is_loopback(&admin),
            "{what}: admin_listen {admin} is loopback; the kubelet could not probe it"
        );
    }
}

#[test]
fn proxy_listener_stays_on_loopback() {
    let docs = load_docs();
    for w in proxy_workloads(&docs) {
        let what = w.doc.what();
        let config = proxy_config_file(&w, &docs);
        if let Some(listen) = setting(&w, &config, "listen") {
            assert!(
                is_loopback(&listen),
                "{what}: listen {listen} is not loopback"
            );
        }
        let allow = setting(&w, &config, "allow_non_loopback").unwrap_or_default();
        assert_ne!(
            allow, "true",
            "{what}: allow_non_loopback must stay off in a pod"
        );
        // On the host network, 127.0.0.1 would be the node's loopback.
        assert_ne!(
            w.spec()["hostNetwork"].as_bool(),
            Some(true),
            "{what}: hostNetwork"
        );
        for c in w.init_containers().iter().chain(w.containers()) {
            for p in seq(&c["ports"]) {
                assert_ne!(
                    p["hostPort"].as_u64(),
                    Some(PROXY_PORT),
                    "{what}: the proxy port must not be a hostPort"
                );
            }
        }
    }
    // No Service may lead to the proxy port.
    for d in docs.iter().filter(|d| d.kind() == "Service") {
        for p in seq(&d.value["spec"]["ports"]) {
            let target = &p["targetPort"];
            let port = target
                .as_u64()
                .or_else(|| p["port"].as_u64().filter(|_| target.is_null()));
            assert_ne!(
                port,
                Some(PROXY_PORT),
                "{}: exposes the proxy port",
                d.what()
            );
            if let Some(name) = target.as_str() {
                assert_eq!(
                    name,
                    "admin",
                    "{}: may only expose the admin port",
                    d.what()
                );
            }
        }
    }
}

#[test]
fn containers_are_locked_down() {
    let docs = load_docs();
    for w in proxy_workloads(&docs) {
        let what = w.doc.what();
        let pod_sc = &w.spec()["securityContext"];
        assert_ne!(
            w.spec()["shareProcessNamespace"].as_bool(),
            Some(true),
            "{what}: a shared process namespace exposes the proxy's secret to the app"
        );
        assert_eq!(
            w.spec()["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{what}: the proxy needs no Kubernetes API token"
        );
        let proxy = w.proxy();
        let sc = &proxy["securityContext"];
        // Container settings override the pod's.
        let eff = |k: &str| -> Value {
            if sc.get(k).is_some() {
                sc[k].clone()
            } else {
                pod_sc[k].clone()
            }
        };
        assert_eq!(
            eff("runAsNonRoot").as_bool(),
            Some(true),
            "{what}: runAsNonRoot"
        );
        assert_eq!(
            eff("runAsUser").as_u64(),
            Some(NONROOT_UID),
            "{what}: runAsUser"
        );
        assert_eq!(
            sc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{what}: readOnlyRootFilesystem"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{what}: allowPrivilegeEscalation"
        );
        assert_ne!(sc["privileged"].as_bool(), Some(true), "{what}: privileged");
        assert!(
            seq(&sc["capabilities"]["drop"])
                .iter()
                .any(|c| s(c) == "ALL"),
            "{what}: capabilities.drop must contain ALL"
        );
        assert!(
            seq(&sc["capabilities"]["add"]).is_empty(),
            "{what}: the proxy needs no capabilities"
        );
        assert_eq!(
            s(&eff("seccompProfile")["type"]),
            "RuntimeDefault",
            "{what}: seccompProfile RuntimeDefault"
        );
        for app in w.apps() {
            let asc = &app["securityContext"];
            let name = s(&app["name"]);
            let non_root = asc["runAsNonRoot"]
                .as_bool()
                .or(pod_sc["runAsNonRoot"].as_bool());
            assert_eq!(non_root, Some(true), "{what}/{name}: runAsNonRoot");
            assert_eq!(
                asc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{what}/{name}"
            );
            assert_ne!(
                asc["privileged"].as_bool(),
                Some(true),
                "{what}/{name}: privileged"
            );
        }
    }
}

#[test]
fn client_secret_is_a_mounted_file() {
    let docs = load_docs();
    for w in proxy_workloads(&docs) {
        let what = w.doc.what();
        let proxy = w.proxy();
        let config = proxy_config_file(&w, &docs);
        for c in w.init_containers().iter().chain(w.containers()) {
            for inline in ["CLIENT_SECRET", "PASSWORD"] {
                assert!(
                    env_entry(c, &format!("{ENV_PREFIX}{inline}")).is_none(),
                    "{what}: {ENV_PREFIX}{inline} puts a secret in the environment; use the _FILE form"
                );
            }
            for e in seq(&c["env"]) {
                assert!(
                    e["valueFrom"].get("secretKeyRef").is_none(),
                    "{what}: env {} comes from a Secret; mount it as a file instead",
                    s(&e["name"])
                );
            }
            assert!(
                seq(&c["envFrom"])
                    .iter()
                    .all(|e| e.get("secretRef").is_none()),
                "{what}: envFrom secretRef puts secrets in the environment"
            );
        }
        for key in ["client_secret", "password"] {
            assert!(
                !config.contains_key(key),
                "{what}: inline {key} in the ConfigMap"
            );
        }
        let method =
            setting(&w, &config, "auth_method").unwrap_or_else(|| "client_credentials".into());
        if method != "client_credentials" {
            continue;
        }
        let path = setting(&w, &config, "client_secret_file")
            .unwrap_or_else(|| panic!("{what}: client_secret_file must be set"));
        let (volume, key) = mounted_file(&w, proxy, &path);
        let secret_name = s(&volume["secret"]["secretName"]);
        assert!(
            !secret_name.is_empty(),
            "{what}: {path} must come from a Secret volume"
        );
        // The example Secret, when present, must provide that key.
        if let Some(example) = find_doc(&docs, "Secret", secret_name) {
            let has = example.value["stringData"].get(key.as_str()).is_some()
                || example.value["data"].get(key.as_str()).is_some();
            assert!(
                has,
                "{}: has no key {key:?} that {what} reads",
                example.what()
            );
        }
        let vol_name = s(&volume["name"]);
        for app in w.apps() {
            assert!(
                seq(&app["volumeMounts"])
                    .iter()
                    .all(|m| s(&m["name"]) != vol_name),
                "{what}: app container {} must not mount the proxy's secret",
                s(&app["name"])
            );
        }
    }
}

#[test]
fn secrets_in_deploy_are_placeholders() {
    let docs = load_docs();
    for d in docs.iter().filter(|d| d.kind() == "Secret") {
        let fname = d.file.file_name().and_then(|f| f.to_str()).unwrap_or("");
        assert!(
            fname.contains(".example."),
            "{}: real Secrets do not belong in git",
            d.what()
        );
        assert!(
            d.value.get("data").is_none(),
            "{}: use stringData placeholders",
            d.what()
        );
        for (k, v) in d.value["stringData"].as_mapping().into_iter().flatten() {
            let v = s(v);
            assert!(
                v.contains("REPLACE") || v.contains("placeholder"),
                "{}: {:?} must be an obvious placeholder",
                d.what(),
                s(k)
            );
        }
    }
}

#[test]
fn resources_are_bounded() {
    let docs = load_docs();
    for w in proxy_workloads(&docs) {
        let what = w.doc.what();
        let r = &w.proxy()["resources"];
        assert!(
            !s(&r["requests"]["cpu"]).is_empty(),
            "{what}: proxy requests.cpu"
        );
        let req = parse_bytes(s(&r["requests"]["memory"]));
        let lim = parse_bytes(s(&r["limits"]["memory"]));
        assert!(
            req > 0 && lim >= req,
            "{what}: proxy memory request {req} / limit {lim}"
        );
        for c in w.init_containers().iter().chain(w.containers()) {
            assert!(
                !s(&c["resources"]["limits"]["memory"]).is_empty(),
                "{what}: container {} has no memory limit",
                s(&c["name"])
            );
        }
    }
}

#[test]
fn grace_period_covers_the_proxy_shutdown() {
    let docs = load_docs();
    for w in proxy_workloads(&docs) {
        let what = w.doc.what();
        let config = proxy_config_file(&w, &docs);
        let delay = parse_duration(&setting(&w, &config, "shutdown_delay").unwrap_or("1s".into()));
        let grace = parse_duration(&setting(&w, &config, "shutdown_grace").unwrap_or("20s".into()));
        let period = w.spec()["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        // The sidecar is signalled after the app containers exit; leave them
        // some of the budget too.
        let needed = (delay + grace).as_secs() + 5;
        assert!(
            period >= needed,
            "{what}: terminationGracePeriodSeconds {period} < shutdown_delay + shutdown_grace + 5s = {needed}"
        );
    }
}

#[test]
fn metrics_are_scrapeable() {
    let docs = load_docs();
    for w in proxy_workloads(&docs) {
        let what = w.doc.what();
        let ann = &w.template["metadata"]["annotations"];
        if w.doc.kind() != "Deployment" && ann.get("prometheus.io/scrape").is_none() {
            continue;
        }
        assert_eq!(
            s(&ann["prometheus.io/scrape"]),
            "true",
            "{what}: prometheus.io/scrape"
        );
        assert_eq!(
            s(&ann["prometheus.io/port"]),
            ADMIN_PORT.to_string(),
            "{what}: prometheus.io/port"
        );
        assert_eq!(
            s(&ann["prometheus.io/path"]),
            "/metrics",
            "{what}: prometheus.io/path"
        );
    }
}

#[test]
fn network_policy_admits_only_the_admin_port() {
    let docs = load_docs();
    let policies: Vec<_> = docs
        .iter()
        .filter(|d| d.kind() == "NetworkPolicy")
        .collect();
    assert!(!policies.is_empty(), "deploy/ needs a NetworkPolicy");
    for p in &policies {
        let spec = &p.value["spec"];
        assert!(
            seq(&spec["policyTypes"]).iter().any(|t| s(t) == "Ingress"),
            "{}: policyTypes must include Ingress",
            p.what()
        );
        for rule in seq(&spec["ingress"]) {
            assert!(
                !seq(&rule["from"]).is_empty(),
                "{}: a rule open to every source",
                p.what()
            );
            let ports = seq(&rule["ports"]);
            assert!(!ports.is_empty(), "{}: a rule open on every port", p.what());
            for port in ports {
                let ok = port["port"].as_u64() == Some(ADMIN_PORT) || s(&port["port"]) == "admin";
                assert!(ok, "{}: only port {ADMIN_PORT} may be admitted", p.what());
            }
        }
    }
    // Every pod running the proxy is covered by an Ingress policy.
    for w in proxy_workloads(&docs) {
        let labels = &w.template["metadata"]["labels"];
        let covered = policies.iter().any(|p| {
            let sel = p.value["spec"]["podSelector"]["matchLabels"].as_mapping();
            sel.is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
        });
        assert!(
            covered,
            "{}: no NetworkPolicy selects its pods",
            w.doc.what()
        );
    }
}

#[test]
fn kustomization_lists_existing_files() {
    let dir = deploy_dir();
    let text =
        std::fs::read_to_string(dir.join("kustomization.yaml")).expect("deploy/kustomization.yaml");
    let k: Value = serde_norway::from_str(&text).expect("kustomization.yaml is YAML");
    assert_eq!(s(&k["kind"]), "Kustomization");
    let mut listed = BTreeSet::new();
    let resources = seq(&k["resources"]);
    assert!(
        !resources.is_empty(),
        "kustomization.yaml lists no resources"
    );
    let mut paths: Vec<String> = resources.iter().map(|r| s(r).to_string()).collect();
    paths.extend(
        seq(&k["patches"])
            .iter()
            .filter_map(|p| p["path"].as_str().map(String::from)),
    );
    for generator in seq(&k["configMapGenerator"])
        .iter()
        .chain(seq(&k["secretGenerator"]))
    {
        paths.extend(seq(&generator["files"]).iter().map(|f| {
            let f = s(f);
            f.split_once('=').map_or(f, |(_, p)| p).to_string()
        }));
    }
    for p in &paths {
        assert!(
            !p.contains("://"),
            "kustomization.yaml: remote resource {p}"
        );
        let full = dir.join(p);
        assert!(
            full.exists(),
            "kustomization.yaml lists {p}, which does not exist"
        );
        listed.insert(p.trim_start_matches("./").to_string());
    }
    assert!(
        !listed.iter().any(|p| p.contains("example")),
        "kustomization.yaml must not apply the placeholder Secret"
    );
    assert!(
        !listed.iter().any(|p| p.starts_with("optional")),
        "optional/ (needs extra CRDs) must stay out of the default resources"
    );
    // Every other top-level manifest is applied, so none is forgotten.
    let mut top: BTreeMap<String, bool> = BTreeMap::new();
    for f in std::fs::read_dir(&dir).expect("read deploy/") {
        let name = f.expect("entry").file_name().to_string_lossy().to_string();
        if name.ends_with(".yaml") && name != "kustomization.yaml" && !name.contains(".example.") {
            top.insert(name.clone(), listed.contains(&name));
        }
    }
    let missing: Vec<_> = top.iter().filter(|(_, l)| !**l).map(|(n, _)| n).collect();
    assert!(
        missing.is_empty(),
        "kustomization.yaml does not list {missing:?}"
    );
    // Operator CRDs only under optional/.
    for d in load_docs() {
        if s(&d.value["apiVersion"]).starts_with("monitoring.coreos.com/") {
            assert!(
                rel(&d.file).contains("optional"),
                "{}: belongs in optional/",
                d.what()
            );
        }
    }
}
