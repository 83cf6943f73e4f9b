//! The Kubernetes packages in deploy/kubernetes, as an operator applies them: every overlay is
//! rendered with `kubectl kustomize`, every object validated against the Kubernetes schemas
//! with `kubernetes-validate` for [`K8S_VERSION`], the rendered berth config checked with
//! `berth check-config` (with the environment the pod gives berth), and the settings that must
//! agree with each other (ports, the mirror address, the volume size and the cache budget, the
//! peer set of the cluster overlay, the generated monitoring objects and their sources)
//! compared. The cluster overlay's checks also run on broken copies of it, which they must
//! catch.
//!
//! `.ci/install-deps` installs kubectl and kubernetes-validate (from PyPI wheels).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::require_binary;
use serde_yaml::Value;

/// The Kubernetes version the manifests are validated for.
const K8S_VERSION: &str = "1.33.0";
/// Every overlay operators apply.
const OVERLAYS: &[&str] = &["cluster", "node", "monitoring"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kubectl kustomize deploy/kubernetes/<overlay>`, as text.
fn render_text(overlay: &str) -> String {
    let out = run(Command::new(require_binary("kubectl"))
        .arg("kustomize")
        .arg(repo().join("deploy/kubernetes").join(overlay)));
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// The rendered objects of an overlay.
fn render(overlay: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&render_text(overlay))
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .collect()
}

use serde::Deserialize as _;

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} rendered"))
}

fn config_map_with_prefix<'a>(objects: &'a [Value], prefix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no ConfigMap {prefix}* rendered"))
}

/// The container `name` of a pod spec.
fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The pod IP [`pod_env`] gives `status.podIP`.
const POD_IP: &str = "10.244.1.7";

/// The environment the kubelet gives a container from its `env` list: `fieldRef`s filled in
/// (the pod IP is [`POD_IP`]), `$(VAR)` expanded from the variables defined before it (an
/// unknown one stays as written, as the kubelet leaves it), `$$` an escaped `$`. Variables from
/// `envFrom` are not included (the overlay's Secrets are optional and absent here).
fn pod_env(container: &Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_sequence().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = match (
            var["value"].as_str(),
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => expand(v, &env),
            (None, Some("status.podIP")) => POD_IP.to_owned(),
            (None, Some("metadata.name")) => "berth-0".to_owned(),
            (None, Some("metadata.namespace")) => "berth".to_owned(),
            (None, other) => panic!("env {name}: no value the test knows how to fill ({other:?})"),
        };
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    }
    env
}

/// Kubernetes' `$(VAR)` expansion of `v` over `defined`.
fn expand(v: &str, defined: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')'))
        {
            match defined.iter().find(|(n, _)| n == name) {
                Some((_, value)) => out.push_str(value),
                None => out.push_str(&rest[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `berth check-config` on a rendered config with the environment `env` (berth's own `BERTH_*`
/// variables of the test process removed). A `cluster.secret_file` (a mounted Secret in the
/// pod) is replaced by a file that exists here.
fn check_config(dir: &Path, text: &str, env: &[(String, String)]) -> Result<(), String> {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile_in(dir)
        .unwrap();
    std::fs::write(file.path(), text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
    cmd.arg("check-config").arg("--config").arg(file.path());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BERTH_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let config: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
    let secret = dir.join("cluster-secret");
    if config
        .get("cluster")
        .and_then(|c| c.get("secret_file"))
        .is_some()
    {
        std::fs::write(&secret, "a secret only this test knows\n").unwrap();
        cmd.arg("--set")
            .arg(format!("cluster.secret_file={}", secret.display()));
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("berth check-config starts");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "berth check-config failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Whether `matchLabels` selects a pod labelled `labels` (an empty selector selects all).
fn selects(match_labels: &Value, labels: &Value) -> bool {
    match_labels
        .as_mapping()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a NetworkPolicy rule's `ports` admit TCP `port` (named `name` in the pod).
fn admits_port(rule: &Value, port: u64, name: &str) -> bool {
    match rule["ports"].as_sequence() {
        None => true,
        Some(ports) if ports.is_empty() => true,
        Some(ports) => ports
            .iter()
            .any(|p| p["port"].as_u64() == Some(port) || p["port"] == name),
    }
}

/// Whether a rule's peers (`from` or `to`) are berth pods of this namespace and nothing else.
fn only_berth_pods(peers: &Value, pod_labels: &Value) -> bool {
    let Some(peers) = peers.as_sequence().filter(|p| !p.is_empty()) else {
        return false; // absent or empty: every source
    };
    peers.iter().all(|p| {
        let sel = &p["podSelector"]["matchLabels"];
        p.get("namespaceSelector").is_none()
            && p.get("ipBlock").is_none()
            && sel.get("app.kubernetes.io/name").is_some()
            && selects(sel, pod_labels)
    })
}

/// What must hold for the cluster overlay's replicas to find each other, reach each other only,
/// and share a tier; each problem in words (empty: none). Also runs `berth check-config` with
/// the pod's environment.
fn cluster_problems(objects: &[Value], dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for o in objects.iter().filter(|o| o["kind"] == "Secret") {
        problems.push(format!(
            "Secret/{} is part of the overlay: its value would be in the repository and the \
             same in every cluster; create it with kubectl instead",
            o["metadata"]["name"].as_str().unwrap_or("?")
        ));
    }
    let Some(sts) = objects
        .iter()
        .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "berth")
    else {
        problems.push("no StatefulSet/berth".into());
        return problems;
    };
    let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(1);
    if replicas < 2 {
        problems.push(format!("replicas: {replicas}: a lone replica has no peers"));
    }
    let namespace = sts["metadata"]["namespace"].as_str().unwrap_or("default");
    let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
    let pod = &sts["spec"]["template"]["spec"];
    let berth = container(pod, "berth");
    let text = config_map_with_prefix(objects, "berth-config")["data"]["berth.toml"]
        .as_str()
        .expect("berth.toml key");
    let config: toml::Value = match toml::from_str(text) {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("berth.toml does not parse: {e}"));
            return problems;
        }
    };

    // The shared tier: one all replicas reach.
    match config
        .get("cache")
        .and_then(|c| c.get("shared"))
        .and_then(|s| s.get("url"))
        .and_then(|u| u.as_str())
    {
        None => problems.push(
            "no [cache.shared] url: every replica would fill from the origin on its own".into(),
        ),
        Some(u) if u.starts_with("file:") => problems.push(format!(
            "cache.shared.url {u}: a directory is per pod here, not shared"
        )),
        Some(_) => {}
    }
    let shared_credentials = berth["envFrom"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["secretRef"]["name"] == "berth-shared-credentials");
    match shared_credentials {
        None => problems.push("no envFrom of Secret berth-shared-credentials".into()),
        Some(e) if e["secretRef"]["optional"].as_bool() != Some(true) => problems.push(
            "envFrom berth-shared-credentials is required: with workload identity there is \
             no such Secret and the pods would not start"
                .into(),
        ),
        Some(_) => {}
    }

    let Some(cluster) = config.get("cluster") else {
        problems.push("no [cluster] in berth.toml".into());
        return problems;
    };
    let port: u64 = cluster
        .get("listen")
        .and_then(|l| l.as_str())
        .and_then(|l| l.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0);
    let peer_port = berth["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|p| p["containerPort"].as_u64() == Some(port));
    let port_name = peer_port.and_then(|p| p["name"].as_str()).unwrap_or("");
    if peer_port.is_none() {
        problems.push(format!("no containerPort {port} (cluster.listen)"));
    }

    // Each replica's identity: its pod IP, from the environment, not from the shared file.
    if cluster.get("advertise").is_some() {
        problems.push(
            "cluster.advertise in berth.toml: every replica would claim the same address".into(),
        );
    }
    let env = pod_env(berth);
    let want = format!("{POD_IP}:{port}");
    match env.iter().find(|(k, _)| k == "BERTH_CLUSTER__ADVERTISE") {
        None => problems.push("BERTH_CLUSTER__ADVERTISE is not set in the pod".into()),
        Some((_, a)) if *a != want => problems.push(format!(
            "BERTH_CLUSTER__ADVERTISE becomes {a:?}, not {want:?} (the pod IP and cluster \
             port; POD_IP must be defined before it)"
        )),
        Some(_) => {}
    }

    // The peer set: a headless Service over exactly these pods, in this namespace.
    match cluster.get("peers_dns").and_then(|d| d.as_str()) {
        None => problems.push("no cluster.peers_dns".into()),
        Some(dns) => {
            let (host, dns_port) = dns.rsplit_once(':').unwrap_or((dns, ""));
            let labels: Vec<&str> = host.split('.').collect();
            let service = match labels.as_slice() {
                [svc, ns, "svc", ..] => objects.iter().find(|o| {
                    o["kind"] == "Service"
                        && o["metadata"]["name"] == *svc
                        && o["metadata"]["namespace"] == *ns
                }),
                _ => None,
            };
            if dns_port != port.to_string() {
                problems.push(format!(
                    "cluster.peers_dns {dns}: port is not cluster.listen's {port}"
                ));
            }
            match service {
                None => problems.push(format!(
                    "cluster.peers_dns {dns} names no Service of the overlay (namespace \
                     {namespace}: <service>.{namespace}.svc.<cluster domain>:<port>)"
                )),
                Some(svc) => {
                    let name = svc["metadata"]["name"].as_str().unwrap_or("?");
                    if svc["spec"]["clusterIP"] != "None" {
                        problems.push(format!(
                            "Service/{name} is not headless: its name resolves to one \
                             virtual IP, not to every replica"
                        ));
                    }
                    if !svc["spec"]["selector"].is_mapping()
                        || !selects(&svc["spec"]["selector"], pod_labels)
                    {
                        problems.push(format!("Service/{name} does not select berth's pods"));
                    }
                }
            }
        }
    }

    // The shared secret: a mounted Secret, required.
    let secret_file = cluster
        .get("secret_file")
        .and_then(|s| s.as_str())
        .unwrap_or("");
    // The deepest mount holding the file (the config volume at /etc/berth holds them all).
    let mount = berth["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let rest = secret_file.strip_prefix(&format!("{}/", m["mountPath"].as_str()?))?;
            Some((m, rest))
        })
        .max_by_key(|(m, _)| m["mountPath"].as_str().map_or(0, str::len));
    let volume = mount.and_then(|(m, rest)| {
        let v = pod["volumes"]
            .as_sequence()?
            .iter()
            .find(|v| v["name"] == m["name"])?;
        // With `items`, only the listed paths exist in the volume.
        let listed = match v["secret"]["items"].as_sequence() {
            None => true,
            Some(items) => items.iter().any(|i| i["path"] == rest),
        };
        listed.then_some(v)
    });
    match volume {
        Some(v) if v["secret"].is_mapping() => {
            if v["secret"]["optional"].as_bool() == Some(true) {
                problems.push(format!(
                    "the Secret {} behind cluster.secret_file is optional: a replica would \
                     start without it",
                    v["secret"]["secretName"].as_str().unwrap_or("?")
                ));
            }
        }
        _ => problems.push(format!(
            "cluster.secret_file {secret_file} is in no mounted Secret"
        )),
    }

    // Only berth pods reach the peer port, and berth pods may connect to it.
    let policies: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["kind"] == "NetworkPolicy"
                && selects(&o["spec"]["podSelector"]["matchLabels"], pod_labels)
        })
        .collect();
    let mut admitted = false;
    for policy in &policies {
        let name = policy["metadata"]["name"].as_str().unwrap_or("?");
        for rule in policy["spec"]["ingress"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            if !admits_port(rule, port, port_name) {
                continue;
            }
            if only_berth_pods(&rule["from"], pod_labels) {
                admitted = true;
            } else {
                problems.push(format!(
                    "NetworkPolicy/{name} admits port {port} from more than berth pods: {:?}",
                    rule["from"]
                ));
            }
        }
    }
    if !admitted {
        problems.push(format!("no NetworkPolicy admits berth pods to port {port}"));
    }
    let egress_limited = policies.iter().any(|p| {
        p["spec"]["policyTypes"]
            .as_sequence()
            .is_some_and(|t| t.iter().any(|t| t == "Egress"))
    });
    let egress_allowed = policies.iter().any(|p| {
        p["spec"]["egress"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|r| {
                admits_port(r, port, port_name)
                    && (r.get("to").is_none() || only_berth_pods(&r["to"], pod_labels))
            })
    });
    if egress_limited && !egress_allowed {
        problems.push(format!(
            "berth pods may not connect to each other's port {port}"
        ));
    }

    if let Err(e) = check_config(dir, text, &env) {
        problems.push(format!("with the pod's environment: {e}"));
    }
    problems
}

/// `kubernetes-validate --strict` on a file; returns (success, output).
fn validate(path: &Path) -> (bool, String) {
    let out = Command::new(require_binary("kubernetes-validate"))
        .args(["--strict", "-k", K8S_VERSION])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("kubernetes-validate starts");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Parses "90GiB" / "100Gi" / "2GB" into bytes.
fn bytes(size: &str) -> u64 {
    let split = size
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(size.len());
    let (n, unit) = size.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("size {size}"));
    n * match unit {
        "" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "GB" | "G" => 1_000_000_000,
        other => panic!("unit {other} in {size}"),
    }
}

#[test]
fn every_overlay_renders_and_every_object_is_valid_for_the_named_kubernetes_version() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let text = render_text(overlay);
        let path = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&path, &text).unwrap();
        let (ok, out) = validate(&path);
        assert!(ok, "{overlay} does not validate for {K8S_VERSION}:\n{out}");
        // Only the prometheus-operator kinds have no schema here (they are checked by shape
        // in `monitoring_objects_wrap_the_alerts_and_dashboard_sources`).
        for line in out.lines().filter(|l| l.contains("Couldn't find schema")) {
            assert!(
                line.contains("kind PrometheusRule") || line.contains("kind ServiceMonitor"),
                "{overlay}: unvalidated object: {line}"
            );
        }
        let passed = out.matches(" passed for resource ").count();
        let kinds = text.lines().filter(|l| l.starts_with("kind: ")).count();
        let crds = text.matches("apiVersion: monitoring.coreos.com/").count();
        assert_eq!(
            passed + crds,
            kinds,
            "{overlay}: every object checked:\n{out}"
        );
    }

    // The validator does reject a broken object (a control for the loop above).
    let broken = render_text("cluster").replace("replicas: 3", "replicas: two");
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let (ok, out) = validate(&path);
    assert!(!ok, "a StatefulSet with `replicas: two` validated:\n{out}");
}

#[test]
fn rendered_configs_pass_check_config_and_agree_with_the_pod_specs() {
    let dir = tempfile::tempdir().unwrap();
    for (overlay, kind) in [("cluster", "StatefulSet"), ("node", "DaemonSet")] {
        let objects = render(overlay);
        let cm = config_map_with_prefix(&objects, "berth-config");
        let text = cm["data"]["berth.toml"].as_str().expect("berth.toml key");
        let workload = object(&objects, kind, "berth");
        let berth = container(&workload["spec"]["template"]["spec"], "berth");
        if let Err(e) = check_config(dir.path(), text, &pod_env(berth)) {
            panic!("{overlay}: {e}");
        }
        let config: toml::Value = toml::from_str(text).unwrap();
        let listen = config["server"]["listen"].as_str().unwrap();
        let admin = config["admin"]["listen"].as_str().unwrap();
        assert!(admin.ends_with(":9090"), "{overlay}: admin {admin}");
        assert_eq!(config["cache"]["dir"].as_str(), Some("/var/cache/berth"));

        let pod = &workload["spec"]["template"]["spec"];
        // The ConfigMap the pod mounts is the generated one (kustomize renamed both).
        let mounted = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "config")
            .expect("config volume");
        assert_eq!(mounted["configMap"]["name"], cm["metadata"]["name"]);
        let port = |name: &str| -> Option<u64> {
            berth["ports"]
                .as_sequence()?
                .iter()
                .find(|p| p["name"] == name)?["containerPort"]
                .as_u64()
        };
        assert_eq!(port("admin"), Some(9090), "{overlay}");
        match overlay {
            "cluster" => {
                assert_eq!(listen, "0.0.0.0:5000");
                assert_eq!(port("registry"), Some(5000));
                // The volume holds the budget plus 10%.
                let claim = &workload["spec"]["volumeClaimTemplates"][0];
                let storage = bytes(
                    claim["spec"]["resources"]["requests"]["storage"]
                        .as_str()
                        .unwrap(),
                );
                let budget = bytes(config["cache"]["disk_bytes"].as_str().unwrap());
                assert!(
                    storage >= budget + budget / 10,
                    "PVC {storage} bytes for a {budget}-byte budget"
                );
                let service = object(&objects, "Service", "berth");
                assert!(
                    service["spec"]["clusterIP"].as_str().is_some()
                        || service["spec"]["type"] == "NodePort",
                    "nodes need a fixed address: {service:?}"
                );
                object(&objects, "PodDisruptionBudget", "berth");
                assert!(
                    pod["topologySpreadConstraints"]
                        .as_sequence()
                        .unwrap()
                        .len()
                        >= 2
                );
            }
            _ => {
                // Node topology: loopback registry on the host network; the init container
                // points the node's runtimes at exactly that address.
                assert_eq!(listen, "127.0.0.1:5000");
                assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
                let init = &pod["initContainers"][0];
                let args: Vec<&str> = init["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .filter_map(|a| a.as_str())
                    .collect();
                assert_eq!(args[0], "node-config");
                assert!(args.contains(&"--mirror=http://127.0.0.1:5000"), "{args:?}");
                assert!(args.contains(&"--cache-owner=65532:65532"), "{args:?}");
                let cache = pod["volumes"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == "cache")
                    .unwrap();
                assert_eq!(cache["hostPath"]["path"], "/var/cache/berth");
                // The init container's flags are ones berth accepts.
                let mut help = Command::new(env!("CARGO_BIN_EXE_berth"));
                let out = run(help.args(["node-config", "--help"]));
                let help = String::from_utf8_lossy(&out.stdout);
                for flag in args.iter().skip(1) {
                    let name = flag.split('=').next().unwrap();
                    assert!(help.contains(name), "berth node-config has no {name}");
                }
            }
        }
    }
}

#[test]
fn cluster_overlay_runs_replicas_that_share_a_tier_and_find_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let objects = render("cluster");
    let problems = cluster_problems(&objects, dir.path());
    assert!(problems.is_empty(), "{problems:#?}");

    let sts = object(&objects, "StatefulSet", "berth");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(3));
    // Peers follow readiness: a replica still rebuilding its index owns no digests.
    let peers = object(&objects, "Service", "berth-peers");
    assert_eq!(
        peers["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(false)
    );
    assert_eq!(peers["spec"]["ports"][0]["port"].as_u64(), Some(5002));
    assert_eq!(peers["spec"]["ports"][0]["targetPort"], "peer");
    let pod = &sts["spec"]["template"]["spec"];
    let berth = container(pod, "berth");
    let env = pod_env(berth);
    assert!(
        env.contains(&(
            "BERTH_CLUSTER__ADVERTISE".to_owned(),
            format!("{POD_IP}:5002")
        )),
        "{env:?}"
    );
    let mount = berth["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "cluster")
        .expect("cluster secret mount");
    assert_eq!(mount["mountPath"], "/etc/berth/cluster");
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "cluster")
        .unwrap();
    assert_eq!(volume["secret"]["secretName"], "berth-cluster");
    assert_eq!(volume["secret"]["items"][0]["key"], "secret");
    assert_eq!(volume["secret"]["items"][0]["path"], "secret");

    // The file alone does not start a replica: its identity comes from the pod.
    let text = config_map_with_prefix(&objects, "berth-config")["data"]["berth.toml"]
        .as_str()
        .unwrap();
    let err = check_config(dir.path(), text, &[]).expect_err("no advertise, no start");
    assert!(err.contains("cluster.advertise"), "{err}");
    let config: toml::Value = toml::from_str(text).unwrap();
    assert_eq!(
        config["cache"]["shared"]["url"].as_str(),
        Some("az://berth-cache")
    );
    assert_eq!(
        config["cluster"]["peers_dns"].as_str(),
        Some("berth-peers.berth.svc.cluster.local:5002")
    );
    assert_eq!(
        config["cluster"]["secret_file"].as_str(),
        Some("/etc/berth/cluster/secret")
    );
}

/// Replaces the rendered cluster config's text with `edit(text)`.
fn edit_config(objects: &mut [Value], edit: impl Fn(&str) -> String) {
    let cm = objects
        .iter_mut()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("berth-config"))
        })
        .unwrap();
    let text = edit(cm["data"]["berth.toml"].as_str().unwrap());
    cm["data"]["berth.toml"] = Value::from(text);
}

fn object_mut<'a>(objects: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    objects
        .iter_mut()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn berth_mut(objects: &mut [Value]) -> &mut Value {
    let sts = object_mut(objects, "StatefulSet", "berth");
    let containers = sts["spec"]["template"]["spec"]["containers"]
        .as_sequence_mut()
        .unwrap();
    containers
        .iter_mut()
        .find(|c| c["name"] == "berth")
        .unwrap()
}

/// A change to the rendered cluster overlay and what [`cluster_problems`] must then say.
type Breakage = (&'static str, &'static str, fn(&mut Vec<Value>));

#[test]
fn broken_cluster_overlays_are_caught() {
    let breakages: &[Breakage] = &[
        ("one replica", "a lone replica", |o| {
            object_mut(o, "StatefulSet", "berth")["spec"]["replicas"] = Value::from(1)
        }),
        ("peers Service with a ClusterIP", "not headless", |o| {
            object_mut(o, "Service", "berth-peers")["spec"]["clusterIP"] = Value::from("10.96.0.51")
        }),
        (
            "peers Service selecting other pods",
            "does not select",
            |o| {
                object_mut(o, "Service", "berth-peers")["spec"]["selector"]
                    ["app.kubernetes.io/component"] = Value::from("node-cache")
            },
        ),
        (
            "advertise not set",
            "BERTH_CLUSTER__ADVERTISE is not set",
            |o| {
                berth_mut(o)["env"]
                    .as_sequence_mut()
                    .unwrap()
                    .retain(|e| e["name"] != "BERTH_CLUSTER__ADVERTISE")
            },
        ),
        (
            "POD_IP defined after advertise",
            "POD_IP must be defined before",
            |o| berth_mut(o)["env"].as_sequence_mut().unwrap().reverse(),
        ),
        (
            "one advertise for all replicas",
            "every replica would claim",
            |o| {
                edit_config(o, |t| {
                    t.replace("[cluster]\n", "[cluster]\nadvertise = \"berth:5002\"\n")
                })
            },
        ),
        ("no peer containerPort", "no containerPort 5002", |o| {
            berth_mut(o)["ports"]
                .as_sequence_mut()
                .unwrap()
                .retain(|p| p["containerPort"].as_u64() != Some(5002))
        }),
        (
            "another namespace, peers_dns not changed",
            "names no Service",
            |o| {
                for obj in o.iter_mut() {
                    if obj["metadata"].get("namespace").is_some() {
                        obj["metadata"]["namespace"] = Value::from("registry");
                    }
                }
            },
        ),
        (
            "peers_dns on another port",
            "port is not cluster.listen",
            |o| edit_config(o, |t| t.replace("cluster.local:5002", "cluster.local:5003")),
        ),
        (
            "optional cluster secret",
            "a replica would start without it",
            |o| {
                let sts = object_mut(o, "StatefulSet", "berth");
                for v in sts["spec"]["template"]["spec"]["volumes"]
                    .as_sequence_mut()
                    .unwrap()
                {
                    if v["name"] == "cluster" {
                        v["secret"]["optional"] = Value::from(true);
                    }
                }
            },
        ),
        (
            "secret file outside the mount",
            "in no mounted Secret",
            |o| {
                edit_config(o, |t| {
                    t.replace("/etc/berth/cluster/secret", "/etc/berth/cluster-secret")
                })
            },
        ),
        (
            "a committed cluster secret",
            "Secret/berth-cluster is part of the overlay",
            |o| {
                o.push(
                serde_yaml::from_str(
                    "apiVersion: v1\nkind: Secret\nmetadata: {name: berth-cluster, namespace: berth}\nstringData: {secret: change-me}\n",
                )
                .unwrap(),
            )
            },
        ),
        (
            "peer port open to every pod",
            "admits port 5002 from more than berth pods",
            |o| {
                object_mut(o, "NetworkPolicy", "berth-peers")["spec"]["ingress"][0]
                    .as_mapping_mut()
                    .unwrap()
                    .remove("from");
            },
        ),
        (
            "peer port open to another namespace",
            "admits port 5002 from more than berth pods",
            |o| {
                object_mut(o, "NetworkPolicy", "berth-peers")["spec"]["ingress"][0]["from"][0]
                    ["namespaceSelector"] = serde_yaml::from_str("{}").unwrap()
            },
        ),
        (
            "peer policy gone",
            "no NetworkPolicy admits berth pods",
            |o| {
                o.retain(|obj| {
                    obj["metadata"]["name"] != "berth-peers" || obj["kind"] != "NetworkPolicy"
                })
            },
        ),
        ("no shared tier", "no [cache.shared] url", |o| {
            edit_config(o, |t| t.replace("url = \"az://berth-cache\"\n", ""))
        }),
        ("a per-pod shared tier", "per pod", |o| {
            edit_config(o, |t| {
                t.replace("az://berth-cache", "file:///var/cache/berth/shared")
            })
        }),
        (
            "credentials required",
            "berth-shared-credentials is required",
            |o| berth_mut(o)["envFrom"][0]["secretRef"]["optional"] = Value::from(false),
        ),
        (
            "an account key in the config",
            "credentials never go in the config file",
            |o| {
                edit_config(o, |t| {
                    t.replace(
                        "# [cache.shared.options]\n",
                        "[cache.shared.options]\naccount_key = \"c2VjcmV0\"\n",
                    )
                })
            },
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let good = render("cluster");
    for (what, expected, breakage) in breakages {
        let mut objects = good.clone();
        breakage(&mut objects);
        assert_ne!(objects, good, "{what}: the breakage changed nothing");
        let problems = cluster_problems(&objects, dir.path());
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{what}: expected a problem containing {expected:?}, got {problems:#?}"
        );
    }
}

#[test]
fn pods_run_locked_down_with_probes_and_resources() {
    for (overlay, kind) in [("cluster", "StatefulSet"), ("node", "DaemonSet")] {
        let objects = render(overlay);
        let sa = object(&objects, "ServiceAccount", "berth");
        assert_eq!(sa["automountServiceAccountToken"].as_bool(), Some(false));
        object(&objects, "NetworkPolicy", "berth");
        let pod = &object(&objects, kind, "berth")["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "berth");
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
        let sc = &pod["securityContext"];
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{overlay}");
        assert_eq!(sc["runAsUser"].as_u64(), Some(65532), "the image's uid");
        assert_eq!(sc["fsGroup"].as_u64(), Some(65532));
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace > 30,
            "grace {grace}s must exceed shutdown_grace (30s)"
        );

        let containers = pod["containers"].as_sequence().unwrap();
        let inits = pod["initContainers"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        for c in containers.iter().chain(inits.iter()) {
            let name = c["name"].as_str().unwrap();
            let csc = &c["securityContext"];
            assert_eq!(
                csc["readOnlyRootFilesystem"].as_bool(),
                Some(true),
                "{name}"
            );
            assert_eq!(
                csc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{name}"
            );
            assert_eq!(csc["capabilities"]["drop"][0], "ALL", "{name}");
            assert!(c["resources"]["limits"]["memory"].is_string(), "{name}");
            assert!(c["resources"]["requests"].is_mapping(), "{name}");
        }
        let berth = &containers[0];
        assert_eq!(berth["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(berth["livenessProbe"]["httpGet"]["path"], "/healthz");
        let startup = &berth["startupProbe"];
        let window = startup["periodSeconds"].as_u64().unwrap()
            * startup["failureThreshold"].as_u64().unwrap();
        assert!(window >= 300, "{overlay}: startup window {window}s");
        // Secrets for credentials and TLS are mounted (optional: absent ones do not block).
        for secret in ["berth-secrets", "berth-tls"] {
            let v = pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["secret"]["secretName"] == secret)
                .unwrap_or_else(|| panic!("{overlay}: no {secret} volume"));
            assert_eq!(v["secret"]["optional"].as_bool(), Some(true));
        }
    }
}

#[test]
fn monitoring_objects_wrap_the_alerts_and_dashboard_sources() {
    let objects = render("monitoring");
    let alerts: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let rule = object(&objects, "PrometheusRule", "berth");
    assert_eq!(
        rule["spec"], alerts,
        "prometheusrule.yaml is stale: run deploy/kubernetes/monitoring/generate.sh"
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/berth-dashboard.json")).unwrap(),
    )
    .unwrap();
    let cm = object(&objects, "ConfigMap", "berth-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let wrapped: serde_json::Value =
        serde_json::from_str(cm["data"]["berth-dashboard.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        wrapped, dashboard,
        "dashboard-configmap.yaml is stale: run deploy/kubernetes/monitoring/generate.sh"
    );

    // The ServiceMonitor finds the base's metrics Service by its labels and port name, and
    // names the job as the alerts expect.
    let monitor = object(&objects, "ServiceMonitor", "berth");
    let metrics_service = object(&render("cluster"), "Service", "berth-metrics").clone();
    let labels = metrics_service["metadata"]["labels"].as_mapping().unwrap();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(labels.get(k), Some(v), "selector {k:?} on berth-metrics");
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(
        endpoint["port"],
        metrics_service["spec"]["ports"][0]["name"]
    );
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "job");
    assert_eq!(endpoint["relabelings"][0]["replacement"], "berth");
    let alerts_text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    assert!(alerts_text.contains("job=\"berth\""));

    // The generator agrees with what is committed.
    run(Command::new("bash")
        .arg(repo().join("deploy/kubernetes/monitoring/generate.sh"))
        .arg("--check"));
}

#[test]
fn prometheus_config_and_grafana_provisioning_are_valid_and_agree() {
    // promtool also loads the rule files the config names (alerts.yml).
    let out = run(Command::new(require_binary("promtool"))
        .args(["check", "config"])
        .arg(repo().join("deploy/prometheus/prometheus.yml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS: 1 rule files found"), "{text}");
    let prometheus: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["job_name"], "berth", "the alerts select job=\"berth\"");

    let dashboards: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/provisioning/dashboards/berth.yaml"))
            .unwrap(),
    )
    .unwrap();
    let provider = &dashboards["providers"][0];
    assert_eq!(provider["type"], "file");
    assert!(provider["options"]["path"]
        .as_str()
        .is_some_and(|p| p.starts_with('/')));
    let datasources: Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            repo().join("deploy/grafana/provisioning/datasources/prometheus.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let ds = &datasources["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    // $__rate_interval needs Grafana to know the scrape interval.
    assert_eq!(
        ds["jsonData"]["timeInterval"], prometheus["global"]["scrape_interval"],
        "Grafana's timeInterval matches Prometheus' scrape_interval"
    );
}
